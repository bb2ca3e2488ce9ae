from .adapter import AttentionGeometry, Coverage, ModelAdapter, grad_2d, is_linear, leaf_parameter, weight_2d  # noqa: F401
from .moe import ExpertMatrix  # noqa: F401
from .capture import BlockInputs, capture_block_inputs, move_outside_blocks  # noqa: F401
from .sequential import Block, BlockPass, block_output, blocks, blocks_bypassed, input_hooks, run_block  # noqa: F401
from .placement import kept_placement, keeps_placement, resolve_device  # noqa: F401
