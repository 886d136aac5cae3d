"""What the tests share, imported like any module (test modules never import each other).

- `stack`: free ports and per-test topics on the embedded broker and Triton (conftest's fixtures).
- `outputs`: reading verdicts, dead letters and committed offsets back from the broker.
- `pipeline`: the pipeline with a scripted guard.
- `faults`: the fault-injection harness (a stack of its own, service processes, accounting).
- `hostile`: hostile inputs and the misbehaving servers that serve them.
- `tiny_llava`: tiny LLaVA-OneVision checkpoints built at test time.
- `tiny_llava15`: tiny LLaVA-1.5 checkpoints (transformers' format and LLaVA's original one).
"""
