"""The model a rank trains: the Transformer, or one pipeline stage of it, with the loss as a
method.

The loss is a method of the module (not a function of its output weight) so that FSDP can
gather the output weight around it (`register_fsdp_forward_method`), and so that a pipeline's
last stage computes chunked cross-entropy without materialising logits.

A stage deletes what it does not own: layers of other stages, the embedding unless it is
stage 0, the final norm and output projection unless it is the last stage. With tied
embeddings and several stages, the last stage holds its own copy of the embedding matrix as
`output` (Megatron's shared embedding): it starts from the embedding's initial value, its
gradient is summed with the first stage's (parallel.pipeline.EmbeddingGroup), so the two
stay equal; checkpoints name it tok_embeddings.weight (framework.runtime.state).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from configs.schema import ModelConfig
from framework.components.loss import chunked_cross_entropy
from framework.components.model import Transformer, copy_into_local, initial_value

TIED_COPY_FQN = "output.weight"
EMBEDDING_FQN = "tok_embeddings.weight"


class StageModel(Transformer):
    """Transformer layers `layer_indices` of pipeline stage `stage` of `num_stages`."""

    def __init__(
        self,
        cfg: ModelConfig,
        stage: int = 0,
        num_stages: int = 1,
        layer_indices: list[int] | None = None,
        loss_chunk_tokens: int = 4096,
    ) -> None:
        super().__init__(cfg)
        self.stage, self.num_stages = stage, num_stages
        self.loss_chunk_tokens = loss_chunk_tokens
        if layer_indices is not None:
            keep = {str(i) for i in layer_indices}
            for name in [name for name in self.layers if name not in keep]:
                del self.layers[name]
        if not self.is_first:
            self.tok_embeddings = None
        if not self.is_last:
            self.norm = None
            self.output = None
        elif self.output is None and self.tok_embeddings is None:
            # tied embeddings on a last stage that is not the first: a copy (see module doc)
            self.output = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.holds_tied_copy = cfg.tie_embeddings and self.is_last and not self.is_first

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def loss(self, hidden: Tensor, targets: Tensor) -> Tensor:
        """Mean cross-entropy of this stage's hidden states (last stage only)."""
        return chunked_cross_entropy(hidden, self.output_weight(), targets, self.loss_chunk_tokens)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Single-process initial values for every parameter; the tied copy gets the
        embedding's."""
        super().init_weights(seed)
        if self.holds_tied_copy:
            assert self.output is not None
            shape = (self.cfg.vocab_size, self.cfg.hidden_size)
            copy_into_local(self.output.weight, initial_value(EMBEDDING_FQN, shape, self.cfg, seed))
