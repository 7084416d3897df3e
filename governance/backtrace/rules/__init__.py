"""Relevance rules, one module per family of ops; importing this package registers them all."""

from . import affine, elementwise, embedding, pooling, shape  # noqa: F401
from . import recurrent  # noqa: F401,E402
# attention after affine: it takes over matmul/bmm/mm and delegates the one-activation case
from . import attention, normalisation  # noqa: F401,E402
from . import moe  # noqa: F401,E402
