"""The machinery below the five stages, one module per concern (the README's "Where things are").

The science is in the stage scripts and common.py; what is here serves them: the runner and the
plumbing (plumbing), the study's files (study), what each stage reads, checked (inputs), WavLM over
many windows at once (batching), the simulated study (simulate, speech), the real dataset
(ds003020, fetch), the cortex (anatomy), summaries of test r (scoring), the stages' figures
(figures), what results were built from (provenance) and stage 03's runs and checkpoints
(checkpoints). Each module's docstring names the stages that use it.

The rule of imports: lib/ sits below common.py and the stages. No module here imports common.py,
a stage script or compare.py; common.py and the scripts import lib/, never the other way; and
lib's modules import each other without a cycle (tests/test_layout.py checks all three).
"""
