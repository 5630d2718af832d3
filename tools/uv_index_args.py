"""Print the index flags pip is configured with (files, environment), spelled for `uv pip install`.

uv reads no pip configuration; without this it would fetch torch's CUDA wheels from pypi.org even where pip
is pointed at a mirror or a local wheelhouse.
"""

import shlex
import subprocess
import sys

# pip's key -> uv's flag (uv calls pip's --index-url --default-index; both take the old spelling)
FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links"}


def main() -> None:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    pairs = []
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        flag = FLAGS.get(name.rsplit(".", 1)[-1])
        if flag:
            for item in shlex.split(value)[0].split() if value else []:
                if [flag, item] not in pairs:
                    pairs.append([flag, item])
    print(shlex.join(arg for pair in pairs for arg in pair))


if __name__ == "__main__":
    main()
