"""moa-jax: MoA (Mixture of Sparse Attention) and Recycled Attention for Llama models in JAX."""

import os as _os

# transformers is here for configs and tokenizers only; without PyTorch its import prints an
# advisory ("PyTorch was not found. Models won't be available ...") on every command.
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
