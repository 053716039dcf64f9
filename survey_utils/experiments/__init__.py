"""The chapters' demonstrations and sweeps, one module per chapter (``chNN_<name>.py``).

A method's contract lives in ``survey_utils.methods``; what a chapter *shows* about it (a fit, a sweep, a
comparison) lives here, and every helper's docstring names the chapter section that explains it.
"""
