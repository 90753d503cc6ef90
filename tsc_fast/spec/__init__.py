"""Permutation symmetry of a network: discover the groups, apply permutations, check invariance, tap features.

    spec = discover(model, example_input)        # PermutationSpec (plain data, printable, JSON-able)
    permuted = permute(model, spec, perms)       # perms: {group: int64 permutation}; new unit i = old perms[g][i]
    check_invariance(model, spec, example_input) # random permutations keep the outputs (else InvarianceError)
    forward_with_taps(model, spec, x, callback)  # callback(group, features, channel_axis) once per group

A tied tensor (one Parameter or buffer under several state_dict names) is one tensor to all of these: the spec
names it once, ``spec.aliases`` maps its other names to that one, and permuting keeps the tie.
"""
from ._apply import (
                     check_invariance,
                     head_order,
                     head_permutation,
                     identity_permutations,
                     permute,
                     permute_state_dict,
                     random_permutations,
                     relative_error,
                     validate_perms,
)
from ._discover import TAP_POINTS, discover
from ._taps import attached_taps, forward_with_taps
from ._types import (
                     AxisRef,
                     InvarianceError,
                     PermutationSpec,
                     SpecError,
                     Tap,
                     UnsupportedOperationError,
                     UntraceableModelError,
)

__all__ = ["discover", "TAP_POINTS", "PermutationSpec", "AxisRef", "Tap", "permute", "permute_state_dict", "check_invariance",
           "random_permutations", "identity_permutations", "validate_perms", "relative_error", "forward_with_taps",
           "attached_taps", "head_permutation", "head_order", "SpecError", "UntraceableModelError",
           "UnsupportedOperationError", "InvarianceError"]
