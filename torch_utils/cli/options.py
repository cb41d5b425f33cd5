"""The one rule for numeric options: a finite number within a stated range.

click.FloatRange lets NaN through (every comparison with NaN is false) and accepts infinity,
and a library function called directly (tests, notebooks) sees no click type at all. Each
range is therefore a `Range`, checked by `Range.check` in the library and by the click types
`Float` / `Int` (which show it in --help, as click's ranges do) in the scripts, with the same words.
"""

import math
import numbers

import click

from torch_utils.errors import OptionError

#----------------------------------------------------------------------------
# A bad number in a library call; the message names the option and its valid range. Also a
# ValueError, which the library raised for such numbers before.


def _number(value):
    return str(value) if isinstance(value, int) else f'{value:g}'

#----------------------------------------------------------------------------
# Bounds of one option. NaN is never valid; infinity only with allow_inf (for options whose
# help says what infinity means, e.g. --S_max=inf: no upper limit).

class Range:
    def __init__(self, min=None, max=None, min_open=False, max_open=False, allow_inf=False, integer=False):
        self.min, self.max, self.min_open, self.max_open = min, max, min_open, max_open
        self.allow_inf, self.integer = allow_inf, integer

    def describe(self):
        """'0<x<=1', as click writes its ranges."""
        low = None if self.min is None else f'{_number(self.min)}{"<" if self.min_open else "<="}'
        high = None if self.max is None else f'{"<" if self.max_open else "<="}{_number(self.max)}'
        if low is None and high is None:
            return 'any finite number' if not self.integer else 'any integer'
        return f'{low or ""}x{high or ""}'

    def problem(self, value):
        """None if `value` is valid, else why not (one phrase)."""
        kind = 'an integer' if self.integer else ('a number' if self.allow_inf else 'a finite number')
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or (self.integer and not float(value).is_integer()):
            return f'{value!r} is not {kind} in the range {self.describe()}'
        if math.isnan(value) or (math.isinf(value) and not self.allow_inf):
            return f'{value} is not {kind} in the range {self.describe()}'
        too_low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
        too_high = self.max is not None and (value >= self.max if self.max_open else value > self.max)
        if too_low or too_high:
            return f'{value} is not in the range {self.describe()}'
        return None

    def check(self, name, value):
        """`value` (None passes: option not given), or OptionError naming the option."""
        if value is None:
            return None
        problem = self.problem(value)
        if problem is not None:
            raise OptionError(f'{name}: {problem}; pass a value in that range.')
        return value

def check_options(ranges, values):
    """Check every values[name] that has a range in `ranges` (a dict name -> Range)."""
    for name, bounds in ranges.items():
        if name in values:
            bounds.check(name, values[name])

#----------------------------------------------------------------------------
# The click types: click's own range types (so --help shows the range) whose conversion is
# replaced by Range.problem, which also refuses NaN and infinity.

class _Checked:
    """Mixed into click's range types: click parses the number, Range.problem judges it."""
    parse = None

    def __init__(self, bounds):
        super().__init__(min=bounds.min, max=bounds.max, min_open=bounds.min_open, max_open=bounds.max_open)
        self.bounds = bounds

    def convert(self, value, param, ctx):
        number = self.parse.convert(value, param, ctx)
        problem = self.bounds.problem(number)
        if problem is not None:
            self.fail(problem, param, ctx)
        return number

class Float(_Checked, click.FloatRange):
    parse = click.FLOAT

class Int(_Checked, click.IntRange):
    parse = click.INT

def option_type(bounds):
    """The click type of a Range: Int for integer ranges, else Float."""
    return Int(bounds) if bounds.integer else Float(bounds)

#----------------------------------------------------------------------------
