"""Every operation discovery understands: the handler tables of ``_module_handlers``, ``_attention_handlers`` and
``_function_handlers``, assembled into the one ``Handlers`` the analysis dispatches through.

An operation gets a handler by registering it in its table, e.g. in ``_module_handlers``::

    @MODULES.register(nn.PReLU)
    def prelu(an: Analysis, call: ModuleCall) -> LayoutTree:
        '''PReLU: a per-channel slope (num_parameters > 1) moves with the channels (dim 1).'''
        if call.module.num_parameters > 1:
            an.axes.attach_dim(call.x[1], join(call.path, "weight"), 0)
        return call.x

Functions and tensor methods likewise: ``@FUNCTIONS.register(torch.cat, ...)``, ``@METHODS.register("expand")``.
"""
from __future__ import annotations

from ._analysis import Handlers, ModuleTable
from ._attention_handlers import ATTENTION_MODULES
from ._function_handlers import FUNCTIONS, METHODS
from ._module_handlers import MODULES

HANDLERS = Handlers(modules=ModuleTable.merge(ATTENTION_MODULES, MODULES), functions=FUNCTIONS, methods=METHODS)
