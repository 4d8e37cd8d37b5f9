"""A Python script that starts a Jupyter kernel with jupyter_client and runs one expression.

Run it with an environment's (or image's) python: it prints the reply status and the
expression's value, e.g. ``ok 42``.
"""

import textwrap


def kernel_round_trip(code: str, kernel_name: str = "python3") -> str:
    return textwrap.dedent(
        f"""
        from jupyter_client.manager import start_new_kernel

        manager, client = start_new_kernel(kernel_name={kernel_name!r}, startup_timeout=60)
        results = []

        def keep_result(message):
            if message["msg_type"] == "execute_result":
                results.append(message["content"]["data"]["text/plain"])

        try:
            reply = client.execute_interactive({code!r}, timeout=60, output_hook=keep_result)
            print(reply["content"]["status"], *results)
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
        """
    )
