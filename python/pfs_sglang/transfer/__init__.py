"""KV transfer between the prefill pool and the decode pools (the ``zmq`` backend).

``zmq_engine`` moves bytes (one-sided writes into registered pool memory, with an
identity handshake and deadlines); ``zmq_backend`` plugs it under SGLang's Mooncake
PD protocol; ``registration`` makes ``--disaggregation-transfer-backend zmq`` exist;
``transfer_report`` puts each request's KV bytes and transfer time in prefill replies.
"""
