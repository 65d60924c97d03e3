"""A stage's served module as a ``torch.export`` program with a dynamic batch size.

The program reads plain tensors, never a :class:`~raytrain_ctr.batch.Batch`:

    program(tables, sparse, dense) -> pCTR [B]

* ``tables``: every ``nn.Embedding`` weight of the served module, by module path. The tables are
  inputs, not parameters, so they are written as files of their own and memory-mapped at load:
  a serving host reads the rows it looks up, never a whole table into memory. A table the
  serving domain never reads (a source-only field of a model over both domains) is exported
  with zero rows.
* ``sparse``: the serving domain's sparse fields as table rows, ``[B]`` or ``[B, L]``, and
  ``dense``: its dense fields ``[B, D]``, both exactly as :class:`~raytrain_ctr.data.encode.FeatureEncoder`
  makes them in training.

The rest of the module (dense layers, running statistics) is inside the program.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from raytrain_ctr.batch import Batch


class ServingModule(nn.Module):
    """``(tables, sparse, dense) → σ(logit)`` of the served module for rows of one domain."""

    def __init__(self, served: nn.Module, tables: dict[str, nn.Embedding], domain: str, dense_fields: tuple[str, ...]):
        super().__init__()
        self.served = served
        self.domain, self.dense_fields = domain, tuple(dense_fields)
        self._tables = tables  # not registered: their weights come in as inputs

    def forward(self, tables: dict[str, torch.Tensor], sparse: dict[str, torch.Tensor],
                dense: torch.Tensor) -> torch.Tensor:
        for name, module in self._tables.items():
            module.weight = tables[name]
        batch = Batch(self.domain, sparse, dense, dense.new_zeros(dense.shape[0]), dense_fields=self.dense_fields)
        return torch.sigmoid(self.served(batch))


@contextmanager
def tables_as_inputs(module: nn.Module) -> Iterator[dict[str, nn.Embedding]]:
    """Every ``nn.Embedding`` of ``module`` with its weight detached from the module (so a forward
    pass reads whatever tensor is assigned to it); the weights are put back on exit."""
    tables = {name: m for name, m in module.named_modules() if isinstance(m, nn.Embedding)}
    weights = {name: m._parameters.pop("weight") for name, m in tables.items()}
    try:
        yield tables
    finally:
        for name, m in tables.items():
            m.__dict__.pop("weight", None)
            m._parameters["weight"] = weights[name]


@dataclass(frozen=True)
class Program:
    """An exported program and the tables it reads (``tables``: the weight per input name; a table
    the program never reads has zero rows)."""

    program: ExportedProgram
    tables: dict[str, torch.Tensor]
    sparse: tuple[str, ...]
    dense: tuple[str, ...]


def _unused_tables(program: ExportedProgram, names: list[str]) -> set[str]:
    """The table inputs (the first user inputs, in order) that no node of the graph reads."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    user_inputs = program.graph_signature.user_inputs
    return {name for name, arg in zip(names, user_inputs) if not placeholders[arg].users}


def export_program(served: nn.Module, example: Batch) -> Program:
    """``served`` (in eval mode) as a program over rows of ``example``'s domain, any batch size.

    ``example``: a few encoded rows of that domain (at least two: a size of one would be taken for a
    constant). The program's outputs are checked against ``served``'s own on them.
    """
    served.eval()
    if len(example) < 2:
        raise ValueError("export needs an example batch of at least two rows")
    with torch.no_grad():
        expected = torch.sigmoid(served(example))
    weights = {name: m.weight.detach() for name, m in served.named_modules() if isinstance(m, nn.Embedding)}
    rows = Dim("batch", min=1)
    shapes = ({name: None for name in weights}, {k: {0: rows} for k in example.sparse}, {0: rows})
    with tables_as_inputs(served) as tables, torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        wrapper = ServingModule(served, tables, example.domain, example.dense_fields).eval()
        program = torch.export.export(wrapper, (weights, dict(example.sparse), example.dense), dynamic_shapes=shapes)
        unused = _unused_tables(program, list(weights))
        if unused:  # re-exported with the unread tables empty: only their dtype is read
            weights = {k: w[:0] if k in unused else w for k, w in weights.items()}
            program = torch.export.export(wrapper, (weights, dict(example.sparse), example.dense),
                                          dynamic_shapes=shapes)
    got = program.module()(weights, dict(example.sparse), example.dense)
    if not torch.allclose(got, expected, atol=1e-6, rtol=0):
        raise RuntimeError(f"the exported program differs from the model by {(got - expected).abs().max():.3g}")
    return Program(program, weights, tuple(example.sparse), tuple(example.dense_fields))
