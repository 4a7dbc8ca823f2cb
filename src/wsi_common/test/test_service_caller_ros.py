"""A query whose answer does not come is asked again; a service that is not there gives None."""
import threading
import time

import pytest
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_srvs.srv import Trigger

from wsi_common.service_caller import query

pytestmark = pytest.mark.ros


@pytest.fixture
def slow_first_answer(ros_node):
    """A Trigger service in its own node and executor thread whose first answer comes after 3 s."""
    asked = []

    def answer(request, response):
        asked.append(time.monotonic())
        if len(asked) == 1:
            time.sleep(3.0)
        response.success, response.message = True, f"answer {len(asked)}"
        return response

    server = Node("slow_first_answer", context=ros_node.context)
    server.create_service(Trigger, "slow_first_answer", answer)
    executor = SingleThreadedExecutor(context=ros_node.context)
    executor.add_node(server)
    spinning = threading.Thread(target=executor.spin, daemon=True)
    spinning.start()
    yield asked
    executor.shutdown()
    server.destroy_node()


def test_a_query_without_an_answer_is_asked_again(ros_node, slow_first_answer):
    client = ros_node.create_client(Trigger, "slow_first_answer")
    answer = query(client, Trigger.Request(), timeout_s=20.0, node=ros_node, answer_wait_s=2.0)
    # The late first answer is not taken for the second's: the client forgot the first request.
    assert answer is not None and answer.message == "answer 2"
    assert len(slow_first_answer) == 2


def test_a_query_of_a_missing_service_is_none(ros_node):
    client = ros_node.create_client(Trigger, "nobody_offers_this")
    started = time.monotonic()
    assert query(client, Trigger.Request(), timeout_s=1.0, node=ros_node) is None
    assert time.monotonic() - started < 5.0
