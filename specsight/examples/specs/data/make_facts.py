"""Write specs/data/facts.jsonl: factual-recall prompts that SmolLM2-135M answers correctly.

Each candidate is (prompt, subject, answer, relation); the subject is the exact substring of the
prompt to noise (a leading space when it follows another word). A candidate is kept when
  * the subject occurs once in the prompt, and its tokens (encode_plain) are exactly one
    contiguous run of the prompt's tokens (encode), starting where the prefix's tokens end;
  * the answer is a single token and does not appear in the prompt (recall, not copying);
  * the model's top-1 next token after the prompt is the answer, with p >= MIN_P (causal
    tracing studies facts the model knows).
The effect of noising the subject (ROME: Gaussian, 3x the embeddings' std, NOISE_SAMPLES
fixed-seed draws) is printed for each kept row, but it selects nothing: the example's claims
about noise must not hold by construction.
At most PER_RELATION rows per relation are kept (highest p first); rows are written sorted by
(relation, prompt). Run from the repo root:  .venv/bin/python specs/data/make_facts.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from specsight.models.load.loader import load_model

OUT = Path(__file__).with_name("facts.jsonl")
MIN_P = 0.2
PER_RELATION = 2
NOISE_SAMPLES = 10
NOISE_SEED = 0

CAPITALS = """France Paris|Germany Berlin|Italy Rome|Spain Madrid|Japan Tokyo|Russia Moscow|
England London|Egypt Cairo|China Beijing|Greece Athens|Portugal Lisbon|Austria Vienna|
Ireland Dublin|Poland Warsaw|Norway Oslo|Sweden Stockholm|Hungary Budapest|Kenya Nairobi|
Peru Lima|Cuba Havana|Canada Ottawa|Australia Canberra|Iran Tehran|Iraq Baghdad|
South Korea Seoul|Denmark Copenhagen|Finland Helsinki|Belgium Brussels|Netherlands Amsterdam"""

LANGUAGES = """France French|Germany German|Italy Italian|Spain Spanish|Japan Japanese|
Russia Russian|China Chinese|Brazil Portuguese|Mexico Spanish|Greece Greek|Poland Polish|
Turkey Turkish|Sweden Swedish|Netherlands Dutch|Portugal Portuguese|Egypt Arabic|Korea Korean|
Argentina Spanish|Israel Hebrew|Iran Persian|Finland Finnish|Vietnam Vietnamese"""

# (subject, answer, relation) for "The {subject} is located in the {relation} of"
LANDMARKS = [
    ("Eiffel Tower", " Paris", "city"),
    ("Colosseum", " Rome", "city"),
    ("Statue of Liberty", " New", "city"),
    ("Kremlin", " Moscow", "city"),
    ("Brandenburg Gate", " Berlin", "city"),
    ("Sagrada Familia", " Barcelona", "city"),
    ("Golden Gate Bridge", " San", "city"),
    ("Acropolis", " Athens", "city"),
    ("Louvre", " Paris", "city"),
    ("Vatican", " Rome", "city"),
    ("Space Needle", " Seattle", "city"),
    ("Hollywood sign", " Los", "city"),
    ("Forbidden City", " Beijing", "city"),
    ("White House", " Washington", "city"),
    ("Parthenon", " Athens", "city"),
    ("Great Wall", " China", "country"),
    ("Taj Mahal", " India", "country"),
    ("Eiffel Tower", " France", "country"),
    ("Colosseum", " Italy", "country"),
    ("Amazon rainforest", " Brazil", "country"),
    ("Great Pyramid", " Egypt", "country"),
    ("Pyramids of Giza", " Egypt", "country"),
    ("Amazon River", " South", "continent"),
    ("Sahara Desert", " Africa", "continent"),
    ("Nile River", " Africa", "continent"),
]
# (subject, answer, relation) for "{subject} is located in the {relation} of"
PLACES = [
    ("Big Ben", " London", "city"),
    ("Buckingham Palace", " London", "city"),
    ("Times Square", " New", "city"),
    ("Red Square", " Moscow", "city"),
    ("Tower Bridge", " London", "city"),
    ("Notre Dame Cathedral", " Paris", "city"),
    ("Mount Everest", " Nepal", "country"),
    ("Mount Fuji", " Japan", "country"),
    ("Stonehenge", " England", "country"),
    ("Machu Picchu", " Peru", "country"),
    ("Angkor Wat", " Cambodia", "country"),
    ("Mount Kilimanjaro", " Tanzania", "country"),
    ("Lake Victoria", " Africa", "continent"),
]
COMPANIES = """Toyota Japan|Volkswagen Germany|Samsung South|Nokia Finland|IKEA Sweden|Sony Japan|
BMW Germany|Ferrari Italy|Nintendo Japan|Honda Japan|Volvo Sweden|Siemens Germany|Renault France|
Fiat Italy|Hyundai South|Nestle Switzerland|Mercedes-Benz Germany|Porsche Germany|Lego Denmark"""

SPORTS = """Michael Jordan basketball|LeBron James basketball|Tiger Woods golf|Roger Federer tennis|
Serena Williams tennis|Lionel Messi soccer|Cristiano Ronaldo soccer|Babe Ruth baseball|
Wayne Gretzky hockey|Tom Brady football|Rafael Nadal tennis|Kobe Bryant basketball|
Muhammad Ali boxing"""

BIRTH = """Leonardo da Vinci Italy|Pablo Picasso Spain|Wolfgang Amadeus Mozart Austria|
Vincent van Gogh Netherlands|Johann Sebastian Bach Germany|William Shakespeare England|
Marie Curie Poland|Frida Kahlo Mexico|Charles Dickens England"""

# (prompt, subject, answer, relation)
MISC = [
    ("The founder of Microsoft is", " Microsoft", " Bill", "founder"),
    ("The founder of Apple is", " Apple", " Steve", "founder"),
    ("The founder of Facebook is", " Facebook", " Mark", "founder"),
    ("The founder of Amazon is", " Amazon", " Jeff", "founder"),
    ("Apple was founded by Steve", "Apple", " Jobs", "founder"),
    ("Microsoft was founded by Bill", "Microsoft", " Gates", "founder"),
    ("Google was founded by Larry", "Google", " Page", "founder"),
    ("The Beatles were a band from the city of", " Beatles", " Liverpool", "home_city"),
    ("Sherlock Holmes lived in the city of", "Sherlock Holmes", " London", "home_city"),
    ("Albert Einstein developed the theory of", "Albert Einstein", " relativity", "known_for"),
    ("Charles Darwin is famous for the theory of", "Charles Darwin", " evolution", "known_for"),
    ("Isaac Newton discovered the law of", "Isaac Newton", " gravity", "known_for"),
    ("The Wright brothers invented the", " Wright brothers", " airplane", "known_for"),
    ("Alexander Graham Bell invented the", "Alexander Graham Bell", " telephone", "known_for"),
    ("The Mona Lisa was painted by", " Mona Lisa", " Leonardo", "creator"),
    ("Romeo and Juliet was written by", "Romeo and Juliet", " William", "creator"),
    ("The iPhone is made by the company", " iPhone", " Apple", "maker"),
    ("Windows is an operating system made by", "Windows", " Microsoft", "maker"),
    ("The PlayStation is a game console made by", " PlayStation", " Sony", "maker"),
    ("Napoleon Bonaparte was the emperor of", "Napoleon Bonaparte", " France", "ruled"),
    ("Barack Obama was the president of the", "Barack Obama", " United", "ruled"),
    ("The currency of the United Kingdom is the", " United Kingdom", " pound", "currency"),
    ("The Danube River flows into the", " Danube River", " Black", "flows_into"),
    ("The Alps are a mountain range in the continent of", " Alps", " Europe", "continent"),
    ("The Andes are a mountain range in the continent of", " Andes", " South", "continent"),
    ("Ottawa is the capital of", "Ottawa", " Canada", "capital_of"),
    ("Cairo is the capital of", "Cairo", " Egypt", "capital_of"),
    ("Tokyo is the capital of", "Tokyo", " Japan", "capital_of"),
    ("Canberra is the capital of", "Canberra", " Australia", "capital_of"),
    ("Lisbon is the capital of", "Lisbon", " Portugal", "capital_of"),
]


def pairs(table: str) -> list[tuple[str, str]]:
    """'Michael Jordan basketball|...' -> [('Michael Jordan', ' basketball'), ...]."""
    out = []
    for item in table.replace("\n", "").split("|"):
        subject, _, answer = item.strip().rpartition(" ")
        out.append((subject, " " + answer))
    return out


def candidates() -> list[tuple[str, str, str, str]]:
    rows = []
    for country, city in pairs(CAPITALS):
        the = "the " if country == "Netherlands" else ""
        rows.append((f"The capital city of {the}{country} is", f" {country}", city, "capital"))
    for country, lang in pairs(LANGUAGES):
        the = "the " if country == "Netherlands" else ""
        rows.append(
            (f"The official language of {the}{country} is", f" {country}", lang, "language")
        )
    for place, answer, rel in LANDMARKS:
        verb = "are" if place.startswith("Pyramids") else "is"
        rows.append(
            (f"The {place} {verb} located in the {rel} of", f" {place}", answer, f"located_{rel}")
        )
    for place, answer, rel in PLACES:
        rows.append((f"{place} is located in the {rel} of", place, answer, f"located_{rel}"))
    for company, country in pairs(COMPANIES):
        rows.append(
            (f"{company} is a company from the country of", company, country, "company_country")
        )
    for person, sport in pairs(SPORTS):
        rows.append((f"{person} is famous for playing the sport of", person, sport, "sport"))
    for person, country in pairs(BIRTH):
        rows.append((f"{person} was born in the country of", person, country, "birth_country"))
    return rows + MISC


def subject_start(tok, prompt: str, subject: str) -> int | None:
    """Index of the subject's token run in encode(prompt), or None unless it is unique and
    aligned with the subject's position in the text."""
    ids, sub = tok.encode(prompt), tok.encode_plain(subject)
    hits = [i for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub]
    if prompt.count(subject) != 1 or len(hits) != 1:
        return None
    n_special = len(ids) - len(tok.encode_plain(prompt))
    prefix = prompt[: prompt.index(subject)]
    expected = n_special + (len(tok.encode_plain(prefix)) if prefix else 0)
    return hits[0] if hits[0] == expected else None


@torch.no_grad()
def next_token_probs(model, embeds: torch.Tensor) -> torch.Tensor:
    return torch.softmax(model(inputs_embeds=embeds).logits[:, -1].float(), dim=-1)


@torch.no_grad()
def noised_prob(model, emb, start, n_sub, answer_id, noise_std) -> float:
    """Mean p(answer) over NOISE_SAMPLES runs with Gaussian noise on the subject embeddings."""
    gen = torch.Generator().manual_seed(NOISE_SEED)
    e = emb.repeat(NOISE_SAMPLES, 1, 1)
    noise = torch.randn((NOISE_SAMPLES, n_sub, e.shape[-1]), generator=gen) * noise_std
    e[:, start : start + n_sub] += noise.to(e.dtype)
    return float(next_token_probs(model, e)[:, answer_id].mean())


def main() -> None:
    m = load_model("smollm2-135m")
    tok, model = m.tokenizer, m.model
    model.train(False)
    noise_std = 3 * float(model.get_input_embeddings().weight.float().std())
    passed, dropped = [], []
    for prompt, subject, answer, relation in candidates():
        ans = tok.encode_plain(answer)
        start = subject_start(tok, prompt, subject)
        if start is None:
            dropped.append((prompt, "subject not one aligned token run"))
            continue
        if len(ans) != 1 or re.search(rf"\b{re.escape(answer.strip())}\b", prompt):
            dropped.append((prompt, "answer multi-token or in prompt"))
            continue
        ids = tok.encode(prompt)
        n_sub = len(tok.encode_plain(subject))
        emb = model.get_input_embeddings()(torch.tensor([ids]))
        clean = next_token_probs(model, emb)[0]
        top, p = int(clean.argmax()), float(clean[ans[0]])
        if top != ans[0] or p < MIN_P:
            dropped.append((prompt, f"top1={tok.token_str(top)!r} p(answer)={p:.3f}"))
            continue
        p_noisy = noised_prob(model, emb, start, n_sub, ans[0], noise_std)
        passed.append(
            {
                "prompt": prompt,
                "subject": subject,
                "answer": answer,
                "relation": relation,
                "p": p,
                "p_noised": p_noisy,
                "n_tokens": len(ids),
                "subject_span": (start, start + n_sub),
            }
        )
    kept, count = [], {}
    for row in sorted(passed, key=lambda r: -r["p"]):
        count[row["relation"]] = count.get(row["relation"], 0) + 1
        if count[row["relation"]] <= PER_RELATION:
            kept.append(row)
    kept.sort(key=lambda r: (r["relation"], r["prompt"]))
    with OUT.open("w") as f:
        for row in kept:
            f.write(
                json.dumps({k: row[k] for k in ("prompt", "subject", "answer", "relation")}) + "\n"
            )
    for prompt, why in dropped:
        print(f"drop  {why:45s} {prompt}")
    for r in kept:
        print(
            f"keep  p={r['p']:.3f} noised={r['p_noised']:.3f} len={r['n_tokens']:2d} "
            f"subj={r['subject_span']} {r['prompt']!r} [{r['subject']!r}] -> {r['answer']!r}"
        )
    mean = sum(r["p"] for r in kept) / max(len(kept), 1)
    print(
        f"{len(candidates())} candidates, {len(passed)} passed, {len(kept)} written; "
        f"mean p(answer) = {mean:.4f}; noise std = {noise_std:.4f}"
    )


if __name__ == "__main__":
    main()
