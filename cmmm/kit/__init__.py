"""The method kit: pieces that several strategies share (prompt sites and layer choices, the
prompted-model strategies' base classes, per-pattern prompts and output layers, task heads,
orthogonal prompt slices, auxiliary losses, exemplars). Strategies build on it; nothing
in the kit imports a strategy, and the kernel (backbone, data, runner, evaluator) does
not import the kit."""
