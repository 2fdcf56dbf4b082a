"""`python -m data_pipeline.synthetic ...`: see `dataset.main`."""

import sys

from data_pipeline.synthetic.dataset import main

sys.exit(main())
