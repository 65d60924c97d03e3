"""Serving throughput: the exported package against the training model in eval mode, in one run.

    python benchmarks/serving.py                          # target_only DCN on the planted data, 3 batch sizes
    python benchmarks/serving.py --method e_cdctr --batches 1 256 4096 --seconds 5

The model is the method's served stage built from the specs (random weights: throughput does not
depend on them), exported exactly as ``raytrain-ctr export`` does. For each batch size it measures
predictions/s over the target's test rows, cycling through them, for

* ``model``: the training path: ``FeatureEncoder.encode`` + the stage's ``logits`` under ``no_grad``;
* ``package``: ``load(package).predict(rows)`` (the same encoder, then the ``torch.export`` program
  over memory-mapped tables); ``package compiled``: the same loaded with ``compile=True``
  (``torch.compile``, compiled in the warm-up pass, not timed);
* ``model forward`` / ``program forward``: the two without the encoding (tensors prepared once).

Ratios are against ``model`` at the same batch size, measured in the same run. Threads: torch's default
(``--threads`` to set).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytrain_ctr.data.dataset import CTRDataset  # noqa: E402
from raytrain_ctr.data.encode import FeatureEncoder  # noqa: E402
from raytrain_ctr.embedding import unsharded_state  # noqa: E402
from raytrain_ctr.methods import StageContext, get_method  # noqa: E402
from raytrain_ctr.models.backbones import ModelConfig  # noqa: E402
from raytrain_ctr.serving import load  # noqa: E402
from raytrain_ctr.serving.export import example_batch, served_model  # noqa: E402
from raytrain_ctr.serving.package import write_package  # noqa: E402
from raytrain_ctr.serving.program import export_program  # noqa: E402


def rate(fn, chunks: list, seconds: float) -> float:
    """Rows per second of ``fn`` over ``chunks`` (cycled) for about ``seconds``, after one warm-up pass."""
    for c in chunks[:3]:
        fn(c)
    rows, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        c = chunks[i % len(chunks)]
        fn(c)
        rows += c.num_rows if isinstance(c, pa.Table) else len(c[2])
        i += 1
    return rows / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/synth", help="a dataset (made with `raytrain-ctr synth` if missing)")
    p.add_argument("--method", default="target_only")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 256, 4096])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if not Path(a.data, "dataset.yaml").exists():
        from raytrain_ctr.data.synth import generate, make_config

        generate(a.data, make_config("default"), parallelism=1)
    ds = CTRDataset.load(a.data)
    specs = {d: ds.domain(d).spec for d in ds.domains}
    cfg = ModelConfig(backbone="dcn", deep=(256, 128), cross_layers=3)
    method = get_method(a.method)
    stage = method.stages[-1]
    ctx = StageContext(stage, specs, cfg, method.args)
    torch.manual_seed(0)
    model = stage.hooks.build(ctx).eval()
    served = served_model(method, stage, specs, cfg, unsharded_state(model))
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = write_package(Path(tmp) / "pkg", export_program(served, example_batch(ds, stage.eval_domain)),
                             specs[stage.eval_domain], {"method": a.method})
        export_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        package = load(path)
        load_s = time.perf_counter() - t0
        compiled = load(path, compile=True)  # compiled on its first call of each batch size (the warm-up pass)
        rows = pa.concat_tables(pq.read_table(f) for f in ds.files(stage.eval_domain, "test"))
        rows = pa.concat_tables([rows] * -(-4 * max(a.batches) // rows.num_rows))  # a few batches of the largest
        encoder = FeatureEncoder(specs[stage.eval_domain])
        print(f"{a.method} ({stage.name}), {rows.num_rows:,} test rows, torch threads {torch.get_num_threads()}; "
              f"export {export_s:.1f} s, package load {load_s:.2f} s")
        print(f"{'batch':>6} {'path':<16} {'rows/s':>12} {'× model':>8}")

        def model_predict(t: pa.Table):
            with torch.no_grad():
                return torch.sigmoid(stage.hooks.logits(model, encoder.encode(t), ctx))

        for b in a.batches:
            chunks = [rows.slice(i, b) for i in range(0, rows.num_rows - b + 1, b)][:2000]
            encoded = [(encoder.encode(c), *encoder.features(c)) for c in chunks]

            def model_forward(e):
                with torch.no_grad():
                    return stage.hooks.logits(model, e[0], ctx)

            def program_forward(e):
                with torch.inference_mode():
                    return package.forward(package.tables, e[1], e[2])

            ref = rate(model_predict, chunks, a.seconds)
            results = {"model": ref, "package": rate(package.predict, chunks, a.seconds),
                       "package compiled": rate(compiled.predict, chunks, a.seconds),
                       "model forward": rate(model_forward, encoded, a.seconds),
                       "program forward": rate(program_forward, encoded, a.seconds)}
            for name, r in results.items():
                print(f"{b:>6} {name:<16} {r:>12,.0f} {r / ref:>8.2f}")


if __name__ == "__main__":
    main()
