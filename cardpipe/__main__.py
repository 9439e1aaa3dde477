import sys

try:
    from cardpipe.cli import main
except KeyboardInterrupt:  # Ctrl-C while the command line is still being imported
    print("cardpipe: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
