"""Loss-scale advisor: which static loss scales S keep every gradient inside a format's range.

From the certified exact trace (:func:`fpgrad.reference.exact.exact_trace`), every non-zero exact value
``e`` of the backward pass is placed against the format, scaled by each power of two ``S``:

- **underflow**: ``|e S| <= smallest_subnormal / 2``: correct rounding gives 0 (the tie goes
  to the even neighbour, 0);
- **subnormal**: it rounds to a non-zero value below the smallest normal (precision already
  lost);
- **overflow**: it rounds to inf (or NaN in formats without inf).

The values: the **gradients** (every parameter gradient), the **signals** (the backward
signals dL/d(output) of every layer) and the **seed** of the backward pass, dL/dL = 1, which
becomes S itself: fpgrad's float16 runs compute the scaled loss in float16, so S must be a
float16 value. Exact zeros are never lost and are not counted.

A scale is *safe* when no gradient underflows (with ``scope="all"``: no backward signal either)
and no value of either group overflows (an overflow anywhere in the backward pass makes
gradients inf or NaN, and the step is skipped). Underflow counts fall and overflow counts rise
with S, so the safe scales are one range of exponents ``lo..hi`` (possibly empty).

The recommended static scale:

1. when some scales keep every value *normal* (full precision) and nothing overflows: 1 if it
   is one of them with ``headroom`` binades of margin on both sides, else the scale halfway
   between the subnormal range and the overflow of the largest gradient or signal (inside that
   range a scale changes no relative precision, only the margins), capped by the seed;
2. else, when the safe range is not empty: the largest safe scale that keeps ``headroom``
   binades (default 3: the largest value may grow 8x) below the overflow of any gradient or
   signal, but not below the middle of the safe range. A larger scale only moves more small
   values out of the subnormal range (Micikevicius et al., 2018: no downside to a large
   scaling factor as long as it does not cause overflow), and a static scale cannot back off
   when training makes some value grow. The seed caps it without headroom (it never grows);
3. with no safe scale: the largest scale without overflow (an overflowing step loses every
   gradient; an underflow loses only the values that underflow).

For torch formats (float16, bfloat16, float32) the advisor also measures: per scale, the rounding zeros
of torch's real backward at that scale against the exact gradients times S, and where dynamic
loss scaling (torch.amp.GradScaler's rules, :class:`fpgrad.run.scaling.DynamicScaler`: start at
2^16, halve and skip on inf/NaN, double after 2000 clean steps) settles at these parameters.

Modules: ``scales`` (counts per power of two), ``advice`` (the result), ``core`` (the advice from
exact values), ``measure`` (torch at each scale, GradScaler), ``layers`` (layer networks).
"""

from fpgrad.diagnose.advisor.advice import Advice
from fpgrad.diagnose.advisor.core import advice_from_values
from fpgrad.diagnose.advisor.layers import advise
from fpgrad.diagnose.advisor.scales import GROUPS, SCOPES, TORCH_FORMATS

__all__ = ["GROUPS", "SCOPES", "TORCH_FORMATS", "Advice", "advice_from_values", "advise"]
