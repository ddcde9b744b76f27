import torch, time, copy, sys
from engine.models import build_backbone
from engine.surgery import compress_model
import torch.nn.functional as F
torch.set_num_threads(1)
B=16
base = build_backbone("small-cnn", weights="none").model
x = torch.randn(B,3,32,32); y = torch.randint(0,10,(B,))
models={}
for m in ["vanilla","asi","lance"]:
    mod = copy.deepcopy(base); mod.train()
    compress_model(mod, m, last_k=4, calibration_loader=[x] if m=="lance" else None, calibration_batches=1)
    models[m]=mod
def step(mod):
    mod.zero_grad(set_to_none=True)
    F.cross_entropy(mod(x), y).backward()
for m,mod in models.items():
    step(mod)
res={m:[] for m in models}
for _ in range(5):
    for m,mod in models.items():
        t=time.perf_counter(); step(mod); res[m].append((time.perf_counter()-t)*1e3)
import statistics
print({m: round(statistics.median(v),2) for m,v in res.items()})
if len(sys.argv)>1:
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as p:
        for _ in range(3): step(models[sys.argv[1]])
    print(p.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=30, max_shapes_column_width=70))
