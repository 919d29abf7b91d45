import sys

from verifier_svc.server import main

sys.exit(main())
