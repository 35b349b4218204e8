"""The method kit: the pieces methods build on, kept out of the strategy files so that a method
stays one short file. Some are shared today (the prompt kit, per-pattern prompts and lookup,
prompt initialisation, orthogonal slices, task heads, auxiliary losses); others are each used by
one method so far but are general enough for the next (exemplars: iCaRL; modality evaluators,
the cross-modal critic: ProMMA; token banks, modality gates: AOEPT; modality generation: MPLMM).
Nothing in the kit imports a strategy, and the kernel (backbone, data, runner, evaluator) does
not import the kit."""
