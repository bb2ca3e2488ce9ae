"""Built-in methods; importing this package registers them."""
from . import magnitude, sparsegpt, wanda  # noqa: F401
