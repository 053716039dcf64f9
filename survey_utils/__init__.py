"""Shared code of the PEFT Survey Companion.

One module per concern: ``zoo`` builds models from configs, ``architecture`` derives their exact
parameter layout from the config alone, ``methods`` holds the PEFT methods (one file per family, each
joining ``methods.registry`` once), ``counting`` counts a built model, ``memory`` models a training
step's memory, ``widgets`` and ``plotting`` drive the chapters, ``figures`` regenerates the survey
figures and ``cli`` exposes all of it as ``python -m survey_utils``.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft) warns on every CPU with AVX512-BF16 that an optional kernel package is
# missing; its own pure-torch path is what runs here. The warning would break the CLI's one-line errors and
# put a red box in the chapters, so only its errors are shown.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)
