"""The scripted chat every path of the benchmark runs: fixed user messages and sampling settings."""

from __future__ import annotations

# Eight user messages of about 40 tokens each (with the benchmark model's tokenizer).
MESSAGES = [
    "日本のおすすめの観光地を教えてください。春にきれいで、電車で行きやすい場所がいいです。",
    "京都について教えてください。三日間の旅行で、お寺や神社を中心に回りたいです。",
    "京都でおいしい食べ物は何ですか?湯豆腐や抹茶のお菓子が気になっています。",
    "雨の日でも楽しめる場所はありますか?博物館や市場など、室内で過ごせるところです。",
    "東京から京都まで新幹線で行くと、時間と料金はどれくらいかかりますか?",
    "泊まるなら旅館とホテルのどちらがいいでしょうか。温泉と朝ごはんが大事です。",
    "お土産には何を買えばいいですか?会社の同僚に配るので、日持ちするものがいいです。",
    "最後に、旅行の持ち物リストを作ってください。三月の京都は寒いと聞きました。",
]

TEMPERATURE = 0.7
SEED = 1234
NEW_TOKENS = 32
