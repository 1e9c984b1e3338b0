"""Model FLOPs: the numerator of MFU, and the compute the time model schedules.

Training FLOPs per token (forward + backward = 3 x forward; a multiply-add is 2 FLOPs):

    6 * N_matmul  +  6 * L * s * n_heads * head_dim

N_matmul counts the weights used in matrix multiplies: every linear layer of every decoder
layer plus the output projection (the embedding lookup is not a matmul; with tied
embeddings the shared weight is counted once, as the output projection). The second term is
causal attention: QK^T and AV cost 4 * s * n_heads * head_dim FLOPs per token per layer in
the forward pass over the full s x s square; a causal kernel computes half of it.
Recomputation is not counted (model FLOPs, not hardware FLOPs).
"""

from configs.schema import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights of one decoder layer used in matmuls (no norms, no biases)."""
    head_dim = cfg.resolved_head_dim
    q_width = cfg.num_heads * head_dim
    kv_width = cfg.num_kv_heads * head_dim
    attention = cfg.hidden_size * (q_width + 2 * kv_width) + q_width * cfg.hidden_size
    mlp = 3 * cfg.hidden_size * cfg.ffn_size
    return attention + mlp


def matmul_params(cfg: ModelConfig) -> int:
    """N_matmul: all decoder layers' matmul weights plus the output projection."""
    return cfg.num_layers * layer_matmul_params(cfg) + cfg.vocab_size * cfg.hidden_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Causal attention (QK^T, AV) training FLOPs per token, all layers."""
    return 6.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 * N_matmul + 6 * L * s * n_heads * head_dim (see the module docstring)."""
    return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)
