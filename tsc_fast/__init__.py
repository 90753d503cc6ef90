"""tsc_fast: fast backdoor purification through weight-space symmetry (TSC).

    perm = tsc_fast.assign.solve(cost)                      # optimal linear assignment (native JV solver)
    spec = tsc_fast.discover(model, example_input)          # permutation groups, found by tracing
    tsc_fast.check_invariance(model, spec, example_input)   # random permutations keep the function
    result = tsc_fast.purify(model, clean_data)             # TSC; result.model, result.history
"""
from . import assign
from .align import realign, unalign
from .spec import PermutationSpec, check_invariance, discover, permute
from .tsc import TSCConfig, TSCResult, purify

__all__ = ["assign", "discover", "check_invariance", "permute", "PermutationSpec", "purify", "TSCConfig",
           "TSCResult", "unalign", "realign"]
from ._version import __version__ as __version__
