import sys

try:
    from cardpipe.cli import run
except KeyboardInterrupt:  # Ctrl-C while the command line is still being imported
    print("cardpipe: interrupted", file=sys.stderr)
    sys.exit(130)

run()
