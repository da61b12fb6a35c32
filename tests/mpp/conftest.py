"""Makes `mpp_layouts` (writers of The Well's and PDEBench's file layouts) importable by the tests."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
