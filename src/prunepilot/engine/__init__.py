from .adapter import AttentionGeometry, ModelAdapter, is_linear, weight_2d  # noqa: F401
from .capture import BlockInputs, capture_block_inputs, move_outside_blocks  # noqa: F401
from .sequential import (block_output, blocks_bypassed, collect, input_hooks, run_block,  # noqa: F401
                         sequential_pass)
from .placement import kept_placement, keeps_placement  # noqa: F401
