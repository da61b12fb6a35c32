"""xVal numeric-token encoders (Golkar et al. 2023): each number becomes one `[NUM]` token whose
embedding is scaled by the number's value; a number head regresses values.

    from encoders.xval import extract_numbers, render_numbers
    parsed = extract_numbers('{"m":1.5,"a":-3e-2}')
    parsed.template   # '{"m":[NUM],"a":[NUM]}'
    parsed.values     # array([ 1.5 , -0.03])
    render_numbers(parsed) == '{"m":1.5,"a":-3e-2}'

The number grammar, sign rule and policies are documented in `encoders/xval/numbers.py` and
docs/xval.md. Model, batching and the family glue live in the sibling modules; torch is only
imported by those.
"""

from encoders.xval.numbers import NUM_MARKER, ParsedText, extract_numbers, format_value, render_numbers

__all__ = ["NUM_MARKER", "ParsedText", "extract_numbers", "format_value", "render_numbers"]
