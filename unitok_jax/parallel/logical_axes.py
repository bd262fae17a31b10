"""The vocabulary of logical axis names used by models. Mesh axes are chosen only in configs.

Models annotate every parameter with these names; `parallel.sharding` maps them to the mesh axes (data, fsdp,
tensor) with the rules in `config.mesh.rules`. Activations are not annotated: batches get their shardings from the
train step's explicit in/out shardings (BATCH and SEQ name those axes in the rule tables).
"""

BATCH = "batch"  # examples
SEQ = "seq"  # image tokens / text positions
EMBED = "embed"  # model width (residual stream)
MLP = "mlp"  # hidden width of MLPs / expanded conv channels
HEADS = "heads"  # fused attention projections (qkv rows, heads x head_dim)
KV = "kv"  # per-head width
CODEBOOK = "codebook"  # codebook entries
VOCAB = "vocab"  # text vocabulary
CONV_IN = "conv_in"  # input channels of a conv kernel
CONV_OUT = "conv_out"  # output channels of a conv kernel
NORM = "norm"  # vectors of norms / biases (always replicated by default rules)

ALL = (BATCH, SEQ, EMBED, MLP, HEADS, KV, CODEBOOK, VOCAB, CONV_IN, CONV_OUT, NORM)
