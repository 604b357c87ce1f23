"""argparse types for the commands' numeric flags: each value is parsed and range-checked where it is
read, so a bad one is argparse's one-line usage error naming the flag (exit 2), never a misleading
failure later on (a --max-docs of -1 reported as "no text in the source") or a traceback.

    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True, text="need 0 < p <= 1"))
    p.add_argument("--shard-tokens", type=positive_int)
    p.add_argument("--max-bytes", type=size)
"""

import argparse
import math
import re


def number(kind, low=None, high=None, *, low_open: bool = False, high_open: bool = False, text: str = ""):
    """An argparse type: an int or a finite float in [low, high] (either end open on request, either
    bound None for none); `text` says what is accepted when a value is out of range."""
    def parse(s: str):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not {'an integer' if kind is int else 'a number'}") from None
        if kind is float and not math.isfinite(v):  # nan slips through every comparison below
            raise argparse.ArgumentTypeError(f"{s} is not a finite number: {text}")
        if ((low is not None and (v <= low if low_open else v < low))
                or (high is not None and (v >= high if high_open else v > high))):
            raise argparse.ArgumentTypeError(f"{s} is out of range: {text}")
        return v
    return parse


positive_int = number(int, 1, text="need a positive whole number (1 or more)")


def seed(bits: int):
    """A seed that fits the generator it feeds: 0 to 2**bits - 1."""
    return number(int, 0, 2**bits - 1, text=f"a seed is a whole number from 0 to {2**bits - 1:,} ({bits} bits)")


def size(text: str) -> int:
    """A positive byte count: '500M', '2G', '1.5e6', '1048576' (K/M/G/T are powers of 1000)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMgGtT]?)[bB]?\s*", text)
    try:
        value = int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2).lower() or " ")) if m else 0
    except (ValueError, OverflowError):
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write a positive size such as 500M or 2G")
    return value
