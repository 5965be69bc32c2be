"""A partner's app that embeds a privet client: it joins a federation with its own reviews.

The app owns its process: privet runs in the background (``Participant.start``), the app keeps
doing its own work (here: printing the participant's status), and ``stop`` leaves cleanly.

    python examples/partner_app/app.py --server coordinator.example.org:9092 \\
        --ca certs/ca.pem --key site-a.key --data reviews.csv --state-dir ./privet-state
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

from torch.utils.data import Dataset

from privet.client import Participant
from privet.common.config import PrivacyConfig


class Reviews(Dataset[tuple[str, int]]):
    """The app's own data: (text, label) pairs it already holds in memory."""

    def __init__(self, path: Path) -> None:
        with open(path, newline="", encoding="utf-8") as fh:
            self.rows = [(r["text"], int(r["label"])) for r in csv.DictReader(fh)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[str, int]:
        return self.rows[i]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--ca", type=Path)
    parser.add_argument("--key", type=Path)
    parser.add_argument("--insecure", action="store_true")
    parser.add_argument("--name", default="partner")
    parser.add_argument("--budget", type=float, default=20.0, help="this site's ε budget")
    parser.add_argument("--rounds", type=int, default=1, help="leave after this many rounds")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    participant = Participant(
        server=args.server,
        data=Reviews(args.data),
        state_dir=args.state_dir,
        # The partner decides its own privacy budget; the coordinator cannot raise it.
        privacy=PrivacyConfig(target_epsilon=args.budget),
        name=args.name,
        ca=args.ca,
        key=args.key,
        insecure=args.insecure,
        num_threads=1,
    )
    participant.start()  # returns at once
    deadline = time.monotonic() + args.timeout
    try:
        while time.monotonic() < deadline:
            s = participant.status()
            print(
                f"status: connected={s.connected} round={s.current_round} phase={s.phase} "
                f"epsilon={s.epsilon} reconnects={s.reconnects} last_error={s.last_error}",
                flush=True,
            )
            # Leave once the last round's evaluation is answered, so no reply is left pending.
            if (
                s.current_round is not None
                and s.current_round >= args.rounds
                and s.phase == "evaluate"
            ):
                print(f"done: reached round {s.current_round}, ε = {s.epsilon:.3f}", flush=True)
                return 0
            time.sleep(2.0)
        print("timed out", flush=True)
        return 1
    finally:
        participant.stop()
        print("stopped", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
