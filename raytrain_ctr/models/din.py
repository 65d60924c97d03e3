"""DIN (Zhou et al., KDD 2018), the single-domain model of MKT's Table 2: each behaviour sequence
pooled by target attention against the row's item (the activation unit, raw scores), concatenated
with the other fields' embeddings and the dense features, then an MLP (``model.deep``) to the logit."""

from __future__ import annotations

import torch
from torch import nn

from raytrain_ctr.batch import Batch
from raytrain_ctr.layers.attention import BehaviourEncoder, attention_queries, behaviour_sequences, unpooled
from raytrain_ctr.layers.inputs import dense_columns, dense_fields_of, embedding_for
from raytrain_ctr.layers.mlp import MLP
from raytrain_ctr.models.backbones import ModelConfig
from raytrain_ctr.spec import DomainSpec, SpecError


class DIN(nn.Module):
    """Embeddings, attention-pooled behaviour sequences, an MLP."""

    def __init__(self, spec: DomainSpec, cfg: ModelConfig, attention_hidden: tuple[int, ...] = (64, 32)):
        super().__init__()
        fields = unpooled(list(spec.sparse_fields))
        if not behaviour_sequences(fields):
            raise SpecError(f"method 'din': domain '{spec.domain}' has no behaviour sequence (a sequence field of "
                            f"the user group) to attend over")
        self.embedding = embedding_for([spec], fields, cfg)
        queries = attention_queries(fields)
        self.sequences = BehaviourEncoder(queries, {s: self.embedding.dim(s) for s in queries}, attention_hidden)
        self.pooled = [f.name for f in self.embedding.pooled_fields]
        self.dense_fields = dense_fields_of([spec])
        width = sum(self.embedding.dim(n) for n in self.pooled) + self.sequences.out_dim + len(self.dense_fields)
        self.mlp = MLP(width, list(cfg.deep), out_dim=1, dropout=cfg.dropout)

    def forward(self, batch: Batch) -> torch.Tensor:
        emb = self.embedding(batch)
        x = torch.cat([*(emb[n] for n in self.pooled), self.sequences(emb, batch),
                       dense_columns(batch, self.dense_fields)], -1)
        return self.mlp(x).squeeze(-1)
