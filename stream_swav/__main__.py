from stream_swav.cli import main
import sys

sys.exit(main())
