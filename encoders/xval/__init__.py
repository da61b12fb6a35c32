"""xVal numeric-token encoders (Golkar et al. 2023): each number becomes one `[NUM]` token whose
embedding is scaled by the number's value; a number head regresses values.

    from encoders.xval import extract_numbers, render_numbers
    parsed = extract_numbers('{"m":1.5,"a":-3e-2}')
    parsed.template   # '{"m":[NUM],"a":[NUM]}'
    parsed.values     # array([ 1.5 , -0.03])
    render_numbers(parsed) == '{"m":1.5,"a":-3e-2}'

The number grammar, sign rule and policies are documented in `encoders/xval/numbers.py` and
docs/xval.md. Modules, one job each (torch is only imported by the model-side ones):
- `numbers`    the number grammar: text <-> template + values
- `tokenizer`  byte-level BPE for the text around numbers
- `normalizer` per-field value maps into [-clip, clip]
- `encodings`  xVal and the text baselines' number tokens
- `prepare`    JSONL / text files -> shards (tokenizer and normaliser fitted on the train split)
- `synth`      built-in corpora (arithmetic, orbits, interpolation) written as JSONL
- `collate`    samples -> padded or packed batches, in loader workers
- `model`      the xVal transformer and its config
- `loss`       masked (MLM) or next-token training objectives
- `inference`  predicted numbers and autoregressive generation
- `evaluate`   per-field number-prediction metrics of a checkpoint
- `family`     the `Family` the trainer sees
"""

from encoders.xval.numbers import NUM_MARKER, ParsedText, extract_numbers, format_value, render_numbers

__all__ = ["NUM_MARKER", "ParsedText", "extract_numbers", "format_value", "render_numbers"]
