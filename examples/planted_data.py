"""Generate planted data, validate it, and stream it through 2 Ray Train workers."""

from raytrain_ctr.data.dataset import CTRDataset
from raytrain_ctr.data.ingest import stream
from raytrain_ctr.data.synth import generate, make_config
from raytrain_ctr.data.validate import validate
from raytrain_ctr.runtime import init_ray

if __name__ == "__main__":
    init_ray()
    generate("data/example", make_config("tiny"))
    ds = CTRDataset.load("data/example")
    for summary in validate(ds):
        print(summary.line())
    print(stream(ds, num_workers=2))
