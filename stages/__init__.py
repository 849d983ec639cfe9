"""deploypipe's stages: one subpackage each (imported as deploypipe.stages.<name>).

Each subpackage has its algorithm in plain modules and a thin ``stage.py`` that registers the stage
(name, config schema, run function) with ``deploypipe.stage.register``.
"""
