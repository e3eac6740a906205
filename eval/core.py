"""Evaluation building blocks, all through the composition code the server runs (DESIGN §6).

Loss of a text = mean next-token NLL over real tokens (no padding in inputs or labels); the same
function index calibration uses.
"""

from composer.loss import token_nll

__all__ = ["token_nll"]
