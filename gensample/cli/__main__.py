import sys

try:
    from . import main
except KeyboardInterrupt:  # Ctrl-C while the command line loads: no traceback
    sys.exit(130)

if __name__ == "__main__":
    main()
