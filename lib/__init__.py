"""The machinery below the five stages, one module per concern (the README's "Where things are").

The science is in the stage scripts and common.py; what is here serves them: the simulated study
(simulate, speech), the real dataset (ds003020, fetch), the cortex (anatomy), probes (probing),
summaries of test r (scoring), what results were built from (provenance), checkpoints
(checkpoints) and plumbing (errors, devices, files, flags). Each module's docstring names the
stages that use it.
"""
