"""QoS profiles of the WSI graph, chosen per kind of data."""
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

# Tiles are the scan's data: reliable, and a history deep enough to ride out a slow consumer
# for a few seconds (16 x 12.6 MB). Consumers detect gaps from Tile.sequence.
TILE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=16,
                      reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)

# Estimates, status and reports: small, reliable, recent ones matter.
EVENT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50,
                       reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.VOLATILE)

# State a late joiner must still get (the scan plan, the last mosaic status).
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)

# A live camera stream: the newest frame is what matters; dropping old frames is correct.
LIVE_IMAGE_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2,
                            reliability=ReliabilityPolicy.BEST_EFFORT,
                            durability=DurabilityPolicy.VOLATILE)
