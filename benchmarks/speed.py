"""UNet-forward speed benchmark; the same as ``agentsd bench speed`` (see agentsd/bench/speed.py).

python benchmarks/speed.py --sizes 512 1024
"""

from agentsd.bench.speed import main

if __name__ == "__main__":
    main()
