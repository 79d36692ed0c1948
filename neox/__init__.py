"""neox: a GPT-NeoX-compatible training pipeline on DeepSpeed.

Layers, lowest first. A module may import modules of its own package and of any package on a lower line, never
one on its own line or a higher one, and never launcher/, tools/, benchmarks/ or tests/. Modules do not import
each other in a cycle, nor another module's private (_underscore) names. tests/unit/test_layering.py reads the
block below and enforces all three.

    config
    tokenizer data model
    optim
    parallel
    checkpoint
    entrypoint
    train
    eval generate plan

config is the typed, validated configuration; tokenizer, data and model know nothing of each other; optim builds
the optimizer every engine steps; parallel splits the model (tensor shards, pipeline stages) and runs it across
ranks; checkpoint is the one home of training state; entrypoint is the shared start of the per-rank programs;
train, eval, generate and plan are those programs (plan may reuse the trainer, nothing reuses plan). launcher/,
tools/ and benchmarks/ sit above all of them.
"""
