import sys

from survey_utils.cli import main

sys.exit(main())
