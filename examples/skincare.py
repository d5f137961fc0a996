"""Write the bundled example: the model card's query and its 10 documents in 5 languages, long format.

python examples/skincare.py examples/skincare.parquet
"""

import sys

import pyarrow as pa
import pyarrow.parquet as pq

QUERY = "Organic skincare products for sensitive skin"
# The documents of jina-reranker-v2-base-multilingual's published example, in its order.
DOCUMENTS = [
    "Organic skincare for sensitive skin with aloe vera and chamomile.",
    "New makeup trends focus on bold colors and innovative techniques",
    "Bio-Hautpflege für empfindliche Haut mit Aloe Vera und Kamille",
    "Neue Make-up-Trends setzen auf kräftige Farben und innovative Techniken",
    "Cuidado de la piel orgánico para piel sensible con aloe vera y manzanilla",
    "Las nuevas tendencias de maquillaje se centran en colores vivos y técnicas innovadoras",
    "针对敏感肌专门设计的天然有机护肤产品",
    "新的化妆趋势注重鲜艳的颜色和创新的技巧",
    "敏感肌のために特別に設計された天然有機スキンケア製品",
    "新しいメイクのトレンドは鮮やかな色と革新的な技術に焦点を当てています",
]
LANGUAGES = ["en", "en", "de", "de", "es", "es", "zh", "zh", "ja", "ja"]
# Sigmoid scores the model card publishes for these pairs (the hold-out check with real weights).
PUBLISHED_SCORES = [0.8311, 0.0940, 0.6334, 0.0827, 0.7621, 0.0995, 0.9263, 0.0583, 0.8418, 0.1112]


def table() -> pa.Table:
    return pa.table(
        {
            "query_id": ["skincare"] * len(DOCUMENTS),
            "query": [QUERY] * len(DOCUMENTS),
            "doc_id": [f"d{i}" for i in range(len(DOCUMENTS))],
            "document": DOCUMENTS,
            "language": LANGUAGES,
            "rank": list(range(1, len(DOCUMENTS) + 1)),
        }
    )


if __name__ == "__main__":
    pq.write_table(table(), sys.argv[1] if len(sys.argv) > 1 else "examples/skincare.parquet")
