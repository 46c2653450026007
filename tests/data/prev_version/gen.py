import csv, sys, json
from pathlib import Path
sys.path.insert(0, "/tmp/old")
import vtx; print(vtx.__file__)
from vtx.io.synth import Shot, write_video
from vtx.pipeline.extract import ExtractConfig, extract
from vtx.pipeline.sampling import FrameSampling
from vtx.train.trainer import TrainConfig, train_head
from vtx.train.evaluate import evaluate_run
d = Path(sys.argv[1]); d.mkdir(parents=True, exist_ok=True)
vids = d / "videos"; vids.mkdir(exist_ok=True)
rows = []
for i in range(4):
    write_video(vids / f"v{i}.mp4", [Shot(12, i % 3, (1, 0)), Shot(12, 3 + i % 2)], size=(64, 48), fps=12, seed=i)
    rows.append((f"v{i}", "warm" if i % 2 else "cold", "train" if i < 3 else "test"))
with open(d / "labels.csv", "w", newline="") as f:
    w = csv.writer(f); w.writerow(["video", "labels", "split"]); w.writerows(rows)
s = extract(ExtractConfig(videos=vids, out=d / "feats.h5", features=("resnet18", "r2plus1d", "vit"), weights="random", frames=FrameSampling(frame_rate=2.0), progress=False, device="cpu", dtype="float32"))
print(s.line())
for head, opts in (("stan", {"d_model": 16, "n_heads": 2, "n_layers": 1}), ("vtn", {"d_model": 16, "n_heads": 2, "n_layers": 1, "window": 4, "max_len": 64})):
    r = train_head(TrainConfig(head=head, features=d / "feats.h5", labels=d / "labels.csv", out=d / head, epochs=1, batch_size=2, device="cpu", head_options=opts), log=lambda m: None)
    evaluate_run(d / head / "best.pt", d / "feats.h5", d / "labels.csv", split="all", predictions_out=d / f"{head}_preds.csv", device="cpu", log=lambda m: None)
    (d / head / "last.pt").unlink()
    for p in (d / head).iterdir():
        if p.name != "best.pt": p.unlink()
