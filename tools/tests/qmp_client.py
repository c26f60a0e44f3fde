"""A stock QMP client (QEMU's own `qemu.qmp` library) for tools/tests/vm_control.rs.

usage: python qmp_client.py SOCKET STEPS-JSON

STEPS-JSON is a list of steps run over one connection, in order:
  {"execute": NAME, "arguments": {...}}          -> {"return": ...} or {"error": {...}}
  {"execute": ..., "event": NAME, "timeout": S}  -> the same plus "event": the first NAME
                                                     event heard after the command, or null
Prints one JSON list of results (plus the greeting as the first element) on stdout.
"""

import asyncio
import json
import sys

from qemu.qmp import EventListener, ExecuteError, QMPClient


async def main(socket: str, steps: list) -> list:
    qmp = QMPClient("viridian-test")
    await qmp.connect(socket)
    out = [{"greeting": qmp.greeting._raw if qmp.greeting else None}]
    try:
        for step in steps:
            listener = EventListener(step["event"]) if "event" in step else None
            if listener:
                qmp.register_listener(listener)
            try:
                try:
                    r = {"return": await qmp.execute(step["execute"], step.get("arguments"))}
                except ExecuteError as e:
                    r = {"error": {"class": e.error_class, "desc": str(e)}}
                if listener:
                    try:
                        ev = await asyncio.wait_for(listener.get(), step.get("timeout", 10))
                        r["event"] = {"event": ev["event"], "data": ev.get("data")}
                    except asyncio.TimeoutError:
                        r["event"] = None
            finally:
                if listener:
                    qmp.remove_listener(listener)
            out.append(r)
    finally:
        await qmp.disconnect()
    return out


if __name__ == "__main__":
    # qemu.qmp hands back its own Message objects for some values: serialize them as JSON.
    print(json.dumps(asyncio.run(main(sys.argv[1], json.loads(sys.argv[2]))),
                     default=lambda m: json.loads(bytes(m))))
