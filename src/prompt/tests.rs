//! The enhancement and advice as a whole, and the table's own invariants.
use super::advice::*;
use super::enhance::*;
use super::rules::*;
use super::text::*;
use super::*;
use crate::families::profile::BandLevel;
use crate::families::FamilyKind;

fn ctx_cfg(cfg: f32) -> PromptContext {
    PromptContext {
        cfg,
        steps: 8,
        profile: FamilyKind::ZImage.profile(),
    }
}

/// The seed's defaults: CFG 1.8, 8 steps, CFG from 3.0 intercepted.
fn ctx() -> PromptContext {
    ctx_cfg(1.8)
}

fn run(prompt: &str) -> Enhanced {
    enhance(prompt, None, &ctx(), true)
}

fn table() -> Rules {
    match Rules::parse(RULES_TOML) {
        Ok(rules) => rules,
        Err(err) => panic!("embedded table rejected: {err}"),
    }
}

fn raw_table() -> RawRules {
    match toml::from_str(RULES_TOML) {
        Ok(raw) => raw,
        Err(err) => panic!("embedded table is not TOML: {err}"),
    }
}

/// Comma-separated items, normalised for duplicate checks.
fn items(text: &str) -> Vec<String> {
    text.split(',')
        .map(|i| i.trim().to_lowercase())
        .filter(|i| !i.is_empty())
        .collect()
}

fn kinds(e: &Enhanced) -> Vec<&str> {
    e.advice.iter().map(|a| a.kind.as_str()).collect()
}

fn advice_of<'a>(e: &'a Enhanced, kind: &str) -> &'a Advice {
    match e.advice.iter().find(|a| a.kind == kind) {
        Some(a) => a,
        None => panic!("no {kind:?} advice in {:?}", e.advice),
    }
}

fn lighting_phrases(rules: &Rules, name: &str) -> Vec<String> {
    rules
        .lighting
        .iter()
        .filter(|l| l.name == name)
        .flat_map(|l| l.phrases.iter().map(|p| p.text.clone()))
        .collect()
}

/// Short, long, multi-subject, already-enhanced, foreign and empty prompts: the inputs the
/// property tests below run over.
const CORPUS: &[&str] = &[
    "a serene mountain lake at dawn",
    "cyberpunk street, neon signs, rain-wet pavement",
    "a serene mountain lake at dawn, mist rising, pine trees on shore, ultra-detailed, cinematic lighting",
    "a cat sleeping in a cozy living room",
    "a woman walking her dog in a city park at sunset",
    "studio portrait of a young woman",
    "snow-capped mountains at sunset",
    "a lighthouse on a cliff during a storm",
    "a red sports car on a wet street at night, neon lights",
    "a dragon flying over a medieval castle",
    "a knight in a foggy forest",
    "wolves howling at the full moon",
    "a cozy cabin in a snowy forest, fireplace",
    "children playing on the beach, sunny afternoon",
    "a cat, a dog and a horse in a meadow",
    "rainy foggy night in a harbor with neon and candlelight",
    "portrait of an old fisherman with deep wrinkles and kind eyes, natural skin texture",
    "a mountain lake with turquoise water at dawn",
    "ramen.",
    "a Cat",
    "a tiny house",
    "an old man and an old woman sitting on a bench in a park on a quiet autumn afternoon with leaves",
    "一只猫坐在窗台上，黄昏",
    "un lac de montagne à l'aube",
    "",
    "   ",
    "!!!",
];

// --- the table -------------------------------------------------------------------------------

#[test]
fn embedded_table_parses_validates_and_covers_all_categories() {
    let rules = table();
    let raw = raw_table();
    let s = &raw.subjects;
    let per_category = [
        ("landscape", s.landscape.len()),
        ("city", s.city.len()),
        ("interior", s.interior.len()),
        ("people", s.people.len()),
        ("animal", s.animal.len()),
        ("food", s.food.len()),
        ("vehicle", s.vehicle.len()),
        ("object", s.object.len()),
        ("fantasy", s.fantasy.len()),
        ("scifi", s.scifi.len()),
    ];
    for (category, n) in per_category {
        assert!(n >= 10, "{category}: only {n} subjects");
    }
    assert!(
        rules.subjects.len() >= 150,
        "{} subjects",
        rules.subjects.len()
    );
    assert!(
        rules.lighting.len() >= 20,
        "{} lighting entries",
        rules.lighting.len()
    );
    for s in &rules.subjects {
        assert!((3..=4).contains(&s.details.len()), "{}", s.name);
    }
    assert!(!rules.general_defects.is_empty());
    for class in [
        Class::Person,
        Class::Animal,
        Class::Fantasy,
        Class::Vehicle,
        Class::Food,
        Class::Object,
        Class::Scifi,
        Class::Urban,
        Class::Interior,
        Class::Landscape,
    ] {
        assert!(
            rules
                .class_defects
                .get(&class)
                .is_some_and(|d| !d.is_empty()),
            "{class:?}"
        );
    }
}

#[test]
fn every_subject_is_recognised_by_its_name_and_each_synonym() {
    let rules = table();
    for s in &rules.subjects {
        for term in &s.terms {
            let text = term_text(term);
            let tokens = tokenize(&text);
            let found = rules.recognise_subjects(&tokens);
            let (names, _) = rules.names(&found, &[]);
            assert_eq!(names, vec![s.name.clone()], "term {text:?}");
        }
    }
}

#[test]
fn added_phrases_never_trigger_anything() {
    // Checked at load time too; this states the guarantee idempotence and "no invented time of
    // day" rest on.
    let rules = table();
    let phrases = rules
        .subjects
        .iter()
        .flat_map(|s| &s.details)
        .chain(rules.lighting.iter().flat_map(|l| &l.phrases));
    for p in phrases {
        let tokens = tokenize(&p.text);
        assert!(rules.recognise_subjects(&tokens).is_empty(), "{:?}", p.text);
        assert!(rules.recognise_lighting(&tokens).is_empty(), "{:?}", p.text);
    }
}

#[test]
fn malformed_tables_are_rejected() {
    let valid = r#"
        ignore = []
        [limits]
        max_subjects = 2
        max_details_per_subject = 3
        max_lighting_entries = 2
        max_lighting_phrases = 3
        max_added_words = 15
        expand_max_words = 15
        max_negative_phrases = 10
        [subjects]
        landscape = [ { name = "lake", details = ["clear water", "reedy banks", "soft ripples"] } ]
        animal = [ { name = "cat", details = ["soft fur", "long whiskers", "alert eyes"] } ]
        [[lighting]]
        name = "sunset"
        triggers = ["sunset"]
        phrases = ["warm orange glow", "long shadows"]
        [negative]
        general = [ { phrase = "jpeg artifacts" } ]
    "#;
    assert!(Rules::parse(valid).is_ok());
    let broken = [
        ("not toml", "limits = [", "TOML"),
        (
            "unknown field",
            &valid.replace("max_subjects", "max_subject"),
            "max_subject",
        ),
        (
            "unknown class",
            &format!("{valid}\n[negative.class]\nrobots = []\n"),
            "robots",
        ),
        (
            "phrase with a time word",
            &valid.replace("soft ripples", "sunset ripples"),
            "sunset ripples",
        ),
        (
            "phrase naming a subject",
            &valid.replace("alert eyes", "lake eyes"),
            "lake eyes",
        ),
        (
            "shared term",
            &valid.replace("name = \"cat\"", "name = \"cat\", also = [\"lakes\"]"),
            "share",
        ),
        (
            "too few details",
            &valid.replace(", \"soft ripples\"", ""),
            "3-4 details",
        ),
    ];
    for (what, text, expected) in broken {
        match Rules::parse(text) {
            Ok(_) => panic!("{what}: accepted"),
            Err(err) => {
                let msg = err.to_string();
                assert!(msg.contains(expected), "{what}: {msg}");
            }
        }
    }
}

#[test]
fn an_empty_rule_set_still_applies_the_default_negative() {
    // What a rejected table degrades to at run time.
    let mut advice_list = Vec::new();
    let e = rewrite(
        &Rules::default(),
        "a serene mountain lake at dawn",
        None,
        &ctx(),
        &mut advice_list,
        &[],
    );
    assert_eq!(e.prompt, "a serene mountain lake at dawn");
    assert_eq!(e.negative_prompt, DEFAULT_NEGATIVE_PROMPT);
    assert!(e.added.prompt.is_empty());
}

#[test]
fn excluded_phrases_stay_out_of_the_prompt_and_the_negative() {
    // The UI's removed chips: what the preview showed, minus what the user took away.
    let ctx = ctx_cfg(1.8);
    let full = enhance("a serene mountain lake at dawn", None, &ctx, true);
    assert!(full.added.prompt.len() >= 2, "{:?}", full.added);
    let gone = full.added.prompt[0].clone();
    let neg_gone = full.added.negative_prompt[0].clone();
    let kept = full.added.prompt[1].clone();
    let e = enhance_with(
        "a serene mountain lake at dawn",
        None,
        &ctx,
        true,
        &[gone.to_uppercase(), format!(" {neg_gone} ")],
    );
    assert!(!e.added.prompt.contains(&gone), "{:?}", e.added);
    assert!(!e.prompt.contains(&gone), "{}", e.prompt);
    assert!(e.added.prompt.contains(&kept));
    assert!(!e.added.negative_prompt.contains(&neg_gone));
    assert!(
        !e.negative_prompt.contains(&neg_gone),
        "{}",
        e.negative_prompt
    );
    // Nothing else changes.
    assert_eq!(e.added.prompt.len(), full.added.prompt.len() - 1);
    assert_eq!(
        e.added.negative_prompt.len(),
        full.added.negative_prompt.len() - 1
    );
}

#[test]
fn phrase_keys_are_the_head_noun_or_modifier_plus_generic_head() {
    let key = |text: &str| -> Vec<String> {
        Phrase::new(text)
            .key
            .iter()
            .map(|w| w.text().to_owned())
            .collect()
    };
    assert_eq!(key("clear water"), ["water"]);
    assert_eq!(key("tangled overhead cables"), ["cables"]);
    assert_eq!(key("cool ambient tone"), ["ambient", "tone"]);
    assert_eq!(key("natural skin texture"), ["skin", "texture"]);
    assert_eq!(key("catchlight in the eyes"), ["eyes"]);
}

// --- the seed's examples -------------------------------------------------------------------

#[test]
fn seed_mountain_lake_at_dawn_gets_details_and_dawn_lighting() {
    let e = run("a serene mountain lake at dawn");
    assert_eq!(
        e.added.prompt,
        [
            "rocky shoreline",
            "clear water",
            "distant peaks",
            "soft golden light",
            "long shadows",
            "cool ambient tone"
        ]
    );
    assert_eq!(
        e.prompt,
        "a serene mountain lake at dawn, rocky shoreline, clear water, distant peaks, soft golden \
         light, long shadows, cool ambient tone"
    );
    assert_eq!(e.recognised.subjects, ["mountain lake"]);
    assert_eq!(e.recognised.lighting, ["dawn"]);
    assert!(e.enhanced);
}

#[test]
fn seed_cyberpunk_street_gets_neon_and_rain_but_no_time_of_day() {
    let rules = table();
    let e = run("cyberpunk street, neon signs, rain-wet pavement");
    assert_eq!(e.recognised.lighting, ["neon", "rain"]);
    let neon = lighting_phrases(&rules, "neon");
    let rain = lighting_phrases(&rules, "rain");
    assert!(
        e.added.prompt.iter().any(|p| neon.contains(p)),
        "{:?}",
        e.added
    );
    assert!(
        e.added.prompt.iter().any(|p| rain.contains(p)),
        "{:?}",
        e.added
    );
    let time_entries = [
        "dawn",
        "sunrise",
        "morning",
        "noon",
        "afternoon",
        "golden hour",
        "sunset",
        "dusk",
        "twilight",
        "blue hour",
        "night",
        "midnight",
    ];
    let time_phrases: Vec<String> = time_entries
        .iter()
        .flat_map(|name| lighting_phrases(&rules, name))
        .collect();
    for added in &e.added.prompt {
        assert!(
            !time_phrases.contains(added),
            "invented time of day: {added}"
        );
    }
    let lower = e.prompt.to_lowercase();
    for word in [
        "night", "dusk", "evening", "sunset", "dawn", "morning", "noon",
    ] {
        assert!(!lower.contains(word), "{word} in {lower}");
    }
}

#[test]
fn seed_sample_prompt_of_fifteen_words_is_still_expanded_within_budget() {
    let prompt =
        "a serene mountain lake at dawn, mist rising, pine trees on shore, ultra-detailed, \
                  cinematic lighting";
    assert_eq!(word_count(prompt), 15);
    let e = run(prompt);
    assert!(!e.added.prompt.is_empty());
    assert_eq!(e.recognised.lighting, ["dawn", "fog"]);
    assert!(word_count(&e.added.prompt.join(", ")) <= table().limits.max_added_words);
    assert!(e.prompt.starts_with(prompt));
}

// --- lighting --------------------------------------------------------------------------------

#[test]
fn each_time_and_weather_word_selects_its_lighting() {
    let rules = table();
    let cases = [
        ("dawn", "dawn"),
        ("sunrise", "sunrise"),
        ("morning", "morning"),
        ("noon", "noon"),
        ("afternoon", "afternoon"),
        ("golden hour", "golden hour"),
        ("sunset", "sunset"),
        ("dusk", "dusk"),
        ("twilight", "twilight"),
        ("blue hour", "blue hour"),
        ("night", "night"),
        ("midnight", "midnight"),
        ("overcast", "overcast"),
        ("fog", "fog"),
        ("mist", "fog"),
        ("rain", "rain"),
        ("snow", "snow"),
        ("storm", "storm"),
        ("neon", "neon"),
        ("candlelight", "candlelight"),
        ("studio lighting", "studio"),
        ("moonlight", "moonlight"),
        ("campfire", "firelight"),
        ("northern lights", "aurora"),
        ("sunshine", "sunny"),
    ];
    for (word, entry) in cases {
        let e = run(&format!("a quiet harbor, {word}"));
        assert_eq!(e.recognised.lighting, [entry], "{word}");
        let phrases = lighting_phrases(&rules, entry);
        assert!(
            e.added.prompt.iter().any(|p| phrases.contains(p)),
            "{word}: {:?}",
            e.added.prompt
        );
    }
}

#[test]
fn without_time_or_weather_words_no_lighting_is_invented() {
    let rules = table();
    let all_light: Vec<String> = rules
        .lighting
        .iter()
        .flat_map(|l| l.phrases.iter().map(|p| p.text.clone()))
        .collect();
    for prompt in [
        "a cat sleeping in a cozy living room",
        "a dragon flying over a medieval castle",
        "bowl of ramen on a wooden table",
        "a pottery studio with shelves of vases",
        "studio ghibli style forest",
    ] {
        let e = run(prompt);
        assert!(
            e.recognised.lighting.is_empty(),
            "{prompt}: {:?}",
            e.recognised
        );
        for added in &e.added.prompt {
            assert!(!all_light.contains(added), "{prompt}: {added}");
        }
    }
}

#[test]
fn look_alike_words_do_not_select_lighting() {
    assert_eq!(
        run("snow-capped mountains at sunset").recognised.lighting,
        ["sunset"]
    );
    assert_eq!(
        run("a woman in an evening gown").recognised.lighting,
        Vec::<String>::new()
    );
    assert_eq!(
        run("studio portrait of a man").recognised.lighting,
        ["studio"]
    );
    assert_eq!(
        run("a rain forest river").recognised.lighting,
        Vec::<String>::new()
    );
}

#[test]
fn at_most_two_lighting_entries_in_prompt_order() {
    let e = run("rainy foggy night in a harbor with neon and candlelight");
    assert_eq!(e.recognised.lighting, ["rain", "fog"]);
    let rules = table();
    let allowed: Vec<String> = ["rain", "fog"]
        .iter()
        .flat_map(|n| lighting_phrases(&rules, n))
        .collect();
    let lights: Vec<&String> = e
        .added
        .prompt
        .iter()
        .filter(|p| allowed.contains(p))
        .collect();
    assert!(!lights.is_empty() && lights.len() <= rules.limits.max_lighting_phrases);
}

// --- matching --------------------------------------------------------------------------------

#[test]
fn plurals_and_synonyms_match() {
    let cases = [
        ("two lakes under clouds", "lake"),
        ("a pack of wolves", "wolf"),
        ("cities from above", "city"),
        ("fishermen mending nets", "fisherman"),
        ("three puppies", "dog"),
        ("elves in a glade", "elf"),
        ("women laughing", "woman"),
        ("children reading", "child"),
        ("bunnies in the grass", "rabbit"),
        ("an alpine lake", "mountain lake"),
        ("steaming dumpling", "dumplings"),
        ("A CAT", "cat"),
        ("a café in paris", "cafe"),
    ];
    for (prompt, subject) in cases {
        let e = run(prompt);
        assert_eq!(
            e.recognised.subjects.first().map(String::as_str),
            Some(subject),
            "{prompt}"
        );
        assert!(!e.added.prompt.is_empty(), "{prompt}");
    }
}

#[test]
fn matching_is_on_whole_words() {
    for prompt in [
        "a catalog of scattered items",
        "a carpet with a category label",
        "bushes along a parking lot",
        "a wooden table",
    ] {
        let e = run(prompt);
        assert!(
            e.recognised.subjects.is_empty(),
            "{prompt}: {:?}",
            e.recognised
        );
        assert_eq!(e.prompt, prompt);
    }
}

#[test]
fn longest_match_wins() {
    assert_eq!(
        run("a mountain lake").recognised.subjects,
        ["mountain lake"]
    );
    assert_eq!(run("a teddy bear").recognised.subjects, ["teddy bear"]);
    assert_eq!(run("a sea turtle").recognised.subjects, ["turtle"]);
    assert_eq!(
        run("cyberpunk street").recognised.subjects,
        ["cyberpunk city"]
    );
    // A multi-word term never spans a comma.
    assert_eq!(
        run("a mountain, lake").recognised.subjects,
        ["mountain", "lake"]
    );
}

#[test]
fn only_the_first_two_subjects_get_details() {
    let rules = table();
    let e = run("a cat, a dog and a horse in a meadow");
    assert_eq!(e.recognised.subjects, ["cat", "dog", "horse", "meadow"]);
    let details_of = |name: &str| -> Vec<String> {
        rules
            .subjects
            .iter()
            .filter(|s| s.name == name)
            .flat_map(|s| s.details.iter().map(|p| p.text.clone()))
            .collect()
    };
    assert!(e.added.prompt.iter().any(|p| details_of("cat").contains(p)));
    for later in ["horse", "meadow"] {
        assert!(
            !e.added.prompt.iter().any(|p| details_of(later).contains(p)),
            "{later}"
        );
    }
}

#[test]
fn what_the_prompt_already_says_is_not_repeated() {
    let e = run("a mountain lake with turquoise water at dawn");
    assert!(
        !e.added.prompt.iter().any(|p| p.contains("water")),
        "{:?}",
        e.added
    );
    assert!(e.added.prompt.contains(&"rocky shoreline".to_owned()));

    let e = run("a mountain lake at dawn, long shadows, soft golden light");
    assert!(!e
        .added
        .prompt
        .iter()
        .any(|p| p == "long shadows" || p == "soft golden light"));

    // Details of different subjects share keys: "natural skin texture" once.
    let e = run("portrait of a woman");
    let n = e
        .added
        .prompt
        .iter()
        .filter(|p| p.contains("skin texture"))
        .count();
    assert_eq!(n, 1, "{:?}", e.added);
}

// --- bounds ----------------------------------------------------------------------------------

#[test]
fn expansion_is_bounded_for_every_subject() {
    let rules = table();
    let limits = rules.limits;
    for s in &rules.subjects {
        let prompt = format!("{} in the rain at sunset", s.name);
        let e = run(&prompt);
        let added_words = word_count(&e.added.prompt.join(", "));
        assert!(
            added_words <= limits.max_added_words,
            "{prompt}: {added_words} words"
        );
        let details = e
            .added
            .prompt
            .iter()
            .filter(|p| s.details.iter().any(|d| &d.text == *p))
            .count();
        assert!(
            (1..=limits.max_details_per_subject).contains(&details),
            "{prompt}: {details} details"
        );
        let lights = e.added.prompt.len() - details;
        assert!(lights <= limits.max_lighting_phrases, "{prompt}");
        assert!(e.added.negative_prompt.len() <= 4 + limits.max_negative_phrases);
    }
}

#[test]
fn long_prompts_are_not_expanded_but_the_negative_is_purified() {
    let prompt = "an old man and an old woman sitting on a bench in a park on a quiet autumn \
                  afternoon with leaves";
    assert!(word_count(prompt) > 15);
    let e = run(prompt);
    assert_eq!(e.prompt, prompt);
    assert!(e.added.prompt.is_empty());
    assert!(
        e.negative_prompt.contains("extra limbs"),
        "{}",
        e.negative_prompt
    );
    assert_eq!(advice_of(&e, "prompt_length").level, AdviceLevel::Warn);
    assert!(advice_of(&e, "enhancement")
        .message
        .contains("not expanded"));
}

// --- negative prompt -----------------------------------------------------------------------

#[test]
fn default_negative_when_guidance_is_on_and_none_was_given() {
    let e = run("a cat");
    assert!(
        e.negative_prompt.starts_with(DEFAULT_NEGATIVE_PROMPT),
        "{}",
        e.negative_prompt
    );
    assert_eq!(
        e.added.negative_prompt.get(..4),
        Some(&["nsfw", "blurry", "deformed", "black screen"].map(String::from)[..])
    );
    assert_eq!(e.original_negative_prompt, None);
    // An empty or blank negative counts as none given.
    let e = enhance("a cat", Some("  "), &ctx(), true);
    assert!(e.negative_prompt.starts_with(DEFAULT_NEGATIVE_PROMPT));
    assert_eq!(e.original_negative_prompt.as_deref(), Some("  "));
}

#[test]
fn guidance_off_skips_the_default_but_shows_the_negative_as_unused() {
    let e = enhance("a cat", None, &ctx_cfg(1.0), true);
    assert!(!e.negative_prompt.contains("black screen"));
    assert!(e.negative_prompt.contains("jpeg artifacts"));
    assert_eq!(advice_of(&e, "negative_unused").level, AdviceLevel::Info);

    // Nothing to show, nothing to warn about (a Chinese prompt with no known subject).
    let e = enhance("一幅抽象画", None, &ctx_cfg(1.0), true);
    assert_eq!(e.negative_prompt, "");
    assert!(!kinds(&e).contains(&"negative_unused"));
}

#[test]
fn user_negative_is_kept_first_and_not_duplicated() {
    let user = "Blurry, EXTRA LIMBS, (jpeg artifacts:1.2)";
    let e = enhance("portrait of a woman", Some(user), &ctx(), true);
    assert!(e.negative_prompt.starts_with(user), "{}", e.negative_prompt);
    for phrase in ["extra limbs", "jpeg artifacts", "nsfw", "black screen"] {
        assert!(
            !e.added.negative_prompt.iter().any(|p| p == phrase),
            "{phrase}"
        );
    }
    assert!(e
        .added
        .negative_prompt
        .contains(&"extra fingers".to_owned()));
}

#[test]
fn anatomy_defects_only_when_people_are_present() {
    for prompt in [
        "a serene mountain lake at dawn",
        "bowl of ramen",
        "a red sports car",
    ] {
        let neg = run(prompt).negative_prompt;
        for anatomy in [
            "extra limbs",
            "extra fingers",
            "malformed hands",
            "distorted face",
        ] {
            assert!(!neg.contains(anatomy), "{prompt}: {neg}");
        }
    }
    for prompt in [
        "portrait of a woman",
        "a knight in armor",
        "children playing",
    ] {
        assert!(
            run(prompt).negative_prompt.contains("extra limbs"),
            "{prompt}"
        );
    }
    assert!(run("a fox in the snow")
        .negative_prompt
        .contains("extra legs"));
}

#[test]
fn defects_the_prompt_asks_for_are_not_negated() {
    assert!(!run("a knight in a foggy forest")
        .negative_prompt
        .contains("low contrast"));
    assert!(!run("flat design poster of a cat")
        .negative_prompt
        .contains("flat lighting"));
    assert!(!run("a muddy river")
        .negative_prompt
        .contains("muddy colors"));
    assert!(run("a river").negative_prompt.contains("muddy colors"));
}

// --- pass-through ----------------------------------------------------------------------------

#[test]
fn disabled_returns_everything_verbatim_with_advice() {
    let e = enhance(" a serene mountain lake at dawn ", None, &ctx(), false);
    assert_eq!(e.prompt, " a serene mountain lake at dawn ");
    assert_eq!(e.negative_prompt, "");
    assert_eq!(e.added, Added::default());
    assert!(!e.enhanced);
    assert_eq!(kinds(&e), ["prompt_length", "cfg", "steps"]);

    let e = enhance("a cat", Some("ugly"), &ctx_cfg(1.0), false);
    assert_eq!(e.negative_prompt, "ugly");
    assert!(kinds(&e).contains(&"negative_unused"));
}

#[test]
fn non_english_prompts_pass_through_with_a_notice() {
    // Chinese has rules of its own (the `chinese_*` tests below).
    for prompt in [
        "해질녘의 산속 호수",
        "夕暮れの山の湖",
        "горное озеро на рассвете",
        "un lac de montagne à l'aube",
        "ein Bergsee bei Sonnenaufgang mit der Sonne",
        "una playa al atardecer con el sol",
    ] {
        let e = run(prompt);
        assert_eq!(e.prompt, prompt);
        assert!(e.added.prompt.is_empty(), "{prompt}");
        assert_eq!(e.negative_prompt, DEFAULT_NEGATIVE_PROMPT, "{prompt}");
        assert!(kinds(&e).contains(&"language"), "{prompt}: {:?}", e.advice);
        assert!(advice_of(&e, "enhancement").message.contains("unchanged"));
    }
    // English with a foreign name in it is still English.
    assert!(!run("Notre Dame de Paris cathedral at dusk")
        .added
        .prompt
        .is_empty());
}

#[test]
fn empty_prompts_pass_through_with_a_notice() {
    for prompt in ["", "   ", ",,,", "!!!"] {
        let e = run(prompt);
        assert_eq!(e.prompt, prompt);
        assert!(e.added.prompt.is_empty());
        assert_eq!(advice_of(&e, "empty").level, AdviceLevel::Warn);
    }
}

#[test]
fn trailing_separators_are_not_doubled() {
    assert!(run("a cat.").prompt.starts_with("a cat, soft detailed fur"));
    assert!(run("a cat, ")
        .prompt
        .starts_with("a cat, soft detailed fur"));
    assert!(run("  a cat").prompt.starts_with("a cat, soft"));
}

// --- properties over the corpus -------------------------------------------------------------

#[test]
fn enhancing_an_enhanced_prompt_adds_nothing() {
    for cfg in [1.0, 1.8] {
        for user_negative in [None, Some("ugly, extra limbs")] {
            for prompt in CORPUS {
                let c = ctx_cfg(cfg);
                let first = enhance(prompt, user_negative, &c, true);
                let second = enhance(&first.prompt, Some(&first.negative_prompt), &c, true);
                assert_eq!(second.added, Added::default(), "{prompt:?} cfg {cfg}");
                assert_eq!(second.prompt, first.prompt);
                assert_eq!(second.negative_prompt, first.negative_prompt);
            }
        }
    }
}

#[test]
fn results_contain_no_duplicate_phrases() {
    for prompt in CORPUS {
        for negative in [None, Some("blurry, watermark, Watermark")] {
            let e = enhance(prompt, negative, &ctx(), true);
            let user_items = items(negative.unwrap_or_default());
            let mut seen = user_items.clone();
            for added in &e.added.negative_prompt {
                let added = added.to_lowercase();
                assert!(!seen.contains(&added), "{prompt:?}: {added} twice");
                seen.push(added);
            }
            let mut seen = items(prompt);
            for added in &e.added.prompt {
                assert!(!seen.contains(&added.to_lowercase()), "{prompt:?}: {added}");
                seen.push(added.to_lowercase());
            }
        }
    }
}

#[test]
fn added_phrases_are_visible_in_the_final_texts() {
    for prompt in CORPUS {
        let e = run(prompt);
        assert_eq!(e.original_prompt, *prompt);
        if e.added.prompt.is_empty() {
            assert_eq!(e.prompt, *prompt);
        } else {
            let sep = if super::zh::is_chinese(prompt) {
                "，"
            } else {
                ", "
            };
            let tail = format!("{sep}{}", e.added.prompt.join(sep));
            assert!(e.prompt.ends_with(&tail), "{:?}", e.prompt);
            assert!(e.prompt.starts_with(prompt.trim().trim_end_matches('.')));
        }
        let tail = e.added.negative_prompt.join(", ");
        assert!(e.negative_prompt.ends_with(&tail));
    }
}

#[test]
fn enhancement_is_deterministic() {
    for prompt in CORPUS {
        let a = run(prompt);
        let b = run(prompt);
        assert_eq!(a, b);
        let ja = serde_json::to_string(&a).ok();
        let jb = serde_json::to_string(&b).ok();
        assert!(ja.is_some());
        assert_eq!(ja, jb);
    }
}

// --- advice ----------------------------------------------------------------------------------

#[test]
fn prompt_length_advice_follows_the_seed_numbers() {
    let cases = [
        ("a cat", AdviceLevel::Info, "8–12"),
        ("a small red fox sitting in fresh snow at dusk", AdviceLevel::Info, "8–12 word range"),
        (
            "a small red fox sitting in fresh snow at dusk under tall old pines",
            AdviceLevel::Info,
            "76.1",
        ),
        (
            "a small red fox sitting in fresh snow at dusk under tall old pines near a frozen river",
            AdviceLevel::Warn,
            "76.1",
        ),
    ];
    for (prompt, level, needle) in cases {
        let a = advice(prompt, &ctx());
        let Some(length) = a.iter().find(|a| a.kind == "prompt_length") else {
            panic!("no prompt_length advice for {prompt}");
        };
        assert_eq!(length.level, level, "{prompt}");
        assert!(
            length.message.contains(needle),
            "{prompt}: {}",
            length.message
        );
        assert!(length
            .message
            .starts_with(&format!("{} word", word_count(prompt))));
    }
}

#[test]
fn cfg_advice_follows_the_seed_numbers() {
    let cases = [
        (1.0, AdviceLevel::Info, "guidance off"),
        (1.5, AdviceLevel::Info, "soft"),
        (1.8, AdviceLevel::Info, "89.6"),
        (2.2, AdviceLevel::Info, "overexpose"),
        (2.6, AdviceLevel::Warn, "overexpose"),
        (3.0, AdviceLevel::Warn, "intercepted"),
        (4.5, AdviceLevel::Warn, "intercepted"),
        (f32::NAN, AdviceLevel::Warn, "not a number"),
    ];
    for (cfg, level, needle) in cases {
        let a = cfg_advice(&ctx_cfg(cfg));
        assert_eq!(a.kind, "cfg");
        assert_eq!(a.level, level, "cfg {cfg}");
        assert!(a.message.contains(needle), "cfg {cfg}: {}", a.message);
    }
    assert!(cfg_advice(&ctx_cfg(3.2)).message.starts_with("CFG 3.2:"));
}

#[test]
fn steps_advice_follows_the_seed_numbers() {
    let cases = [
        (2, AdviceLevel::Warn, "composition"),
        (4, AdviceLevel::Info, "composition only"),
        (6, AdviceLevel::Info, "basic texture"),
        (8, AdviceLevel::Info, "default"),
        (10, AdviceLevel::Info, "little gain"),
        (12, AdviceLevel::Warn, "over-sharpen"),
        (30, AdviceLevel::Warn, "over-sharpen"),
    ];
    for (steps, level, needle) in cases {
        let a = steps_advice(&PromptContext { steps, ..ctx() });
        assert_eq!(a.level, level, "{steps} steps");
        assert!(a.message.contains(needle), "{steps}: {}", a.message);
    }
}

#[test]
fn unet_turbo_families_get_their_own_advice() {
    let ctx = PromptContext {
        cfg: 1.0,
        steps: 1,
        profile: FamilyKind::SdTurbo.profile(),
    };
    let a = advice("a red fox in the snow", &ctx);
    assert!(a[1].message.contains("guidance off"), "{}", a[1].message);
    assert!(
        a[2].message.contains("1 step: the default"),
        "{}",
        a[2].message
    );
    assert_eq!(a[2].level, AdviceLevel::Info);
    let many = advice("a red fox", &PromptContext { steps: 8, ..ctx });
    assert_eq!(many[2].level, AdviceLevel::Warn);
    let hot = advice("a red fox", &PromptContext { cfg: 2.5, ..ctx });
    assert_eq!(hot[1].level, AdviceLevel::Warn);
    let e = enhance("a red fox", Some("blurry"), &ctx, false);
    let unused = e
        .advice
        .iter()
        .find(|a| a.kind == "negative_unused")
        .unwrap();
    assert!(!unused.message.contains("1.8"), "{}", unused.message);
}

#[test]
fn every_job_gets_length_cfg_and_steps_advice() {
    for prompt in CORPUS {
        let e = run(prompt);
        let k = kinds(&e);
        assert!(k.contains(&"cfg") && k.contains(&"steps"), "{prompt:?}");
        assert!(
            k.contains(&"prompt_length") || k.contains(&"language") || k.contains(&"empty"),
            "{prompt:?}"
        );
        assert!(k.contains(&"enhancement"), "{prompt:?}");
    }
}

#[test]
fn word_count_counts_what_a_user_sees_as_words() {
    let cases = [
        ("", 0),
        ("  ,  ", 0),
        ("a cat", 2),
        ("ultra-detailed, cinematic lighting", 3),
        ("rain-wet pavement", 2),
        ("a,b,,c", 3),
        ("a  serene\tlake\n", 3),
    ];
    for (text, n) in cases {
        assert_eq!(word_count(text), n, "{text:?}");
    }
}

#[test]
fn numbers_are_shown_without_float_noise() {
    assert_eq!(fmt_num(1.8), "1.8");
    assert_eq!(fmt_num(3.0), "3.0");
    assert_eq!(fmt_num(1.85), "1.85");
}

/// The advice never names a family: it is the profile's band sentence, placeholders filled.
#[test]
fn advice_renders_the_profiles_bands() {
    for kind in FamilyKind::ALL {
        let profile = kind.profile();
        for cfg in [1.0, 1.5, 1.8, 2.0, 2.2, 2.6, 3.0, 7.5] {
            let ctx = PromptContext {
                cfg,
                steps: 1,
                profile,
            };
            let a = cfg_advice(&ctx);
            let band = profile.cfg.band(cfg).unwrap();
            let want = profile.render(band.advice, &fmt_num(cfg), &fmt_num(profile.defaults.cfg));
            assert_eq!(a.message, want, "{kind} cfg {cfg}");
            assert!(!a.message.contains('{'), "{kind}: {}", a.message);
            let warn = matches!(band.level, BandLevel::Warn | BandLevel::Bad);
            assert_eq!(a.level == AdviceLevel::Warn, warn, "{kind} cfg {cfg}");
        }
        for steps in [1, 2, 4, 5, 8, 10, 12, 30] {
            let ctx = PromptContext {
                cfg: 1.0,
                steps,
                profile,
            };
            let a = steps_advice(&ctx);
            assert!(a.message.starts_with(&steps.to_string()), "{}", a.message);
            assert!(!a.message.contains('{'), "{kind}: {}", a.message);
        }
    }
}

// --- wire format -----------------------------------------------------------------------------

#[test]
fn serialises_for_the_api() {
    let e = run("a serene mountain lake at dawn");
    let json = match serde_json::to_value(&e) {
        Ok(v) => v,
        Err(err) => panic!("{err}"),
    };
    assert_eq!(json["added"]["prompt"][0], "rocky shoreline");
    assert_eq!(json["added"]["negative_prompt"][0], "nsfw");
    assert_eq!(json["advice"][0]["level"], "info");
    assert_eq!(json["enhanced"], true);
    assert!(json["original_negative_prompt"].is_null());
    let back: Enhanced = match serde_json::from_value(json.clone()) {
        Ok(v) => v,
        Err(err) => panic!("{err}"),
    };
    assert_eq!(back, e);

    // Records written before `recognised` existed still load.
    let mut old = json;
    if let Some(map) = old.as_object_mut() {
        map.remove("recognised");
    }
    let back: Result<Enhanced, _> = serde_json::from_value(old);
    assert!(back.is_ok_and(|b| b.recognised == Recognised::default()));

    let warn = serde_json::to_string(&AdviceLevel::Warn).ok();
    assert_eq!(warn.as_deref(), Some("\"warn\""));
}

// ---- Chinese prompts (the table's `[zh]` section) ----
// Expected phrases are the table's own entries (rules.toml, `[zh]`); the invariants are those of the
// English table (idempotence, no invented time of day), checked over a spread of prompts.

const ZH_PROMPTS: &[&str] = &[
    "黎明时分宁静的山间湖泊",
    "一只猫坐在窗台上",
    "雪山下的湖泊",
    "夜晚下雨的城市街道，霓虹灯",
    "黄昏时分在海滩上奔跑的女孩",
    "竹林中的大熊猫",
    "清晨的古镇，薄雾",
    "一碗热气腾腾的拉面",
    "暴风雨中的城堡和巨龙",
    "老人和孩子在公园里下棋",
    "宇宙飞船",
    "一幅抽象画",
];

#[test]
fn chinese_dawn_lake_gets_its_details_and_dawn_light() {
    let e = run("黎明时分宁静的山间湖泊");
    assert_eq!(e.recognised.subjects, ["湖泊"]);
    assert_eq!(e.recognised.lighting, ["黎明"]);
    assert!(
        e.added.prompt.iter().any(|p| p == "柔和的金色晨光"),
        "{:?}",
        e.added
    );
    assert!(e.added.prompt.iter().any(|p| p == "如镜的水面"));
    assert!(
        e.prompt.starts_with("黎明时分宁静的山间湖泊，"),
        "joined with the full-width comma: {}",
        e.prompt
    );
    let added: usize = e.added.prompt.iter().map(|p| p.chars().count()).sum();
    assert!(added <= table().zh.limits.max_added_chars, "{added}");
    let summary = &e
        .advice
        .iter()
        .find(|a| a.kind == "enhancement")
        .unwrap()
        .message;
    assert!(
        summary.contains("湖泊") && summary.contains("黎明"),
        "{summary}"
    );
}

#[test]
fn chinese_enhancement_is_idempotent() {
    for ctx in [ctx(), ctx_cfg(1.0)] {
        for p in ZH_PROMPTS {
            let once = enhance(p, None, &ctx, true);
            let twice = enhance(&once.prompt, Some(&once.negative_prompt), &ctx, true);
            assert_eq!(twice.prompt, once.prompt, "prompt of {p}");
            assert!(twice.added.prompt.is_empty(), "{p}: {:?}", twice.added);
            assert!(
                twice.added.negative_prompt.is_empty(),
                "{p}: {:?}",
                twice.added
            );
            assert_eq!(
                twice.negative_prompt, once.negative_prompt,
                "negative of {p}"
            );
        }
    }
}

#[test]
fn chinese_without_time_or_weather_words_no_lighting_is_invented() {
    let rules = table();
    let lighting_phrases: Vec<&str> = rules
        .zh
        .lighting
        .iter()
        .flat_map(|l| l.phrases.iter().map(String::as_str))
        .collect();
    for p in [
        "一只猫坐在窗台上",
        "雪山下的湖泊",
        "竹林中的大熊猫",
        "一碗热气腾腾的拉面",
        "热带雨林里的瀑布",
        "穿雨衣的男孩",
    ] {
        let e = run(p);
        assert!(e.recognised.lighting.is_empty(), "{p}: {:?}", e.recognised);
        assert!(
            e.added
                .prompt
                .iter()
                .all(|a| !lighting_phrases.contains(&a.as_str())),
            "{p}: {:?}",
            e.added
        );
        // The time words are the table's triggers: none may appear in what was added.
        let added = e.added.prompt.join("");
        for l in &rules.zh.lighting {
            for t in &l.triggers {
                assert!(!added.contains(t.as_str()), "{p}: {added} says {t}");
            }
        }
    }
    // 雪山 is a mountain, not a snowfall; 下雪 is.
    assert_eq!(run("下雪的山峰").recognised.lighting, ["雪"]);
}

#[test]
fn chinese_negatives_name_the_subjects_defects_once() {
    let e = run("黄昏时分在海滩上奔跑的女孩");
    for d in ["畸形的手", "多余的手指"] {
        assert!(
            e.added.negative_prompt.iter().any(|n| n == d),
            "{:?}",
            e.added
        );
        assert!(e.negative_prompt.contains(d));
    }
    // The default negative comes first when guidance is on and the user gave none.
    assert!(e.negative_prompt.starts_with(DEFAULT_NEGATIVE_PROMPT));
    // Already in the user's negative: not added again.
    let e = enhance("一个女孩的肖像", Some("畸形的手"), &ctx(), true);
    assert!(!e.added.negative_prompt.iter().any(|n| n == "畸形的手"));
    assert!(e.added.negative_prompt.iter().any(|n| n == "多余的手指"));
    // `unless`: a neon scene is saturated on purpose.
    let e = run("霓虹灯下的湖泊");
    assert!(
        !e.added.negative_prompt.iter().any(|n| n == "过度饱和"),
        "{:?}",
        e.added
    );
    assert!(run("湖泊")
        .added
        .negative_prompt
        .iter()
        .any(|n| n == "过度饱和"));
    // A removed chip stays removed.
    let e = enhance_with("黎明的湖泊", None, &ctx(), true, &["柔和的金色晨光".into()]);
    assert!(!e.prompt.contains("柔和的金色晨光"), "{}", e.prompt);
    assert!(e.added.prompt.iter().any(|p| p == "如镜的水面"));
}

#[test]
fn long_chinese_prompts_are_not_expanded_and_other_scripts_left_alone() {
    let long = "清晨的湖泊边上有一座古老的木屋，屋前停着一辆红色的自行车，远处是连绵起伏的青山和飘动的白云";
    assert!(cjk_chars(long) > table().zh.limits.expand_max_chars);
    let e = run(long);
    assert!(e.added.prompt.is_empty(), "{:?}", e.added);
    assert_eq!(e.prompt, long);
    let summary = &e
        .advice
        .iter()
        .find(|a| a.kind == "enhancement")
        .unwrap()
        .message;
    assert!(summary.contains("not expanded"), "{summary}");
    // Japanese (kana) is not Chinese: left as written.
    let e = run("夜明けの湖");
    assert!(e.added.prompt.is_empty());
    assert_eq!(e.prompt, "夜明けの湖");
}

#[test]
fn chinese_prompt_length_is_counted_in_characters() {
    // 20 characters, no spaces: one "word" to a word counter.
    let p = "黄昏时分在金色的海滩上奔跑的女孩和她的狗";
    assert_eq!(cjk_chars(p), 20);
    let a = prompt_advice(p);
    assert_eq!(a.kind, "prompt_length");
    assert!(
        a.message.starts_with("20 Chinese characters"),
        "{}",
        a.message
    );
    assert!(
        a.message.contains("not measured for Chinese"),
        "{}",
        a.message
    );
    assert_eq!(prompt_advice("湖泊").level, AdviceLevel::Info);
    let long = "湖".repeat(41);
    assert_eq!(prompt_advice(&long).level, AdviceLevel::Warn);
}

#[test]
fn a_zh_phrase_with_a_trigger_is_rejected() {
    let text = RULES_TOML.replace("\"柔和的金色晨光\"", "\"柔和的黄昏光\"");
    let err = Rules::parse(&text).expect_err("a phrase with a trigger");
    assert!(err.to_string().contains("柔和的黄昏光"), "{err}");
}

// --- languages -------------------------------------------------------------------------------

/// Every advice kind, over prompts and settings that reach each branch (English, Chinese, other
/// scripts, each CFG and step band of both families, guidance off with a negative), comes with
/// its Chinese sentence, which states the same numbers as the English one.
#[test]
fn every_advice_has_its_chinese_text_with_the_same_numbers() {
    use crate::i18n::{has_cjk, number_set};
    let prompts = [
        "",
        "a cat",
        "a small red fox sitting in fresh snow at dusk",
        "a small red fox sitting in fresh snow at dusk near an old wooden barn",
        "a small red fox sitting in fresh snow at dusk near an old wooden barn under tall dark \
         pine trees with falling snowflakes",
        "a cat on a sofa",
        "a wooden chair",
        "Восход над горным озером",
        "un chat sur le canapé au soleil",
        "猫",
        "一只橘猫趴在窗台上晒太阳，黎明",
        "一只橘猫趴在窗台上晒太阳，窗外是下着小雨的城市街道和霓虹灯",
        "一只橘猫趴在窗台上晒太阳，窗外是下着小雨的城市街道和霓虹灯，远处有高楼和飞过的鸽子，\
         天空是灰蓝色的",
        "一张桌子",
    ];
    let mut seen = std::collections::BTreeSet::new();
    for kind in FamilyKind::ALL {
        let profile = kind.profile();
        let cfgs: Vec<f32> = profile
            .cfg
            .bands
            .iter()
            .map(|b| b.max.map_or(4.5, |m| m - 0.01))
            .chain([f32::NAN, 1.0])
            .collect();
        let steps: Vec<u32> = profile
            .steps
            .bands
            .iter()
            .map(|b| b.max.map_or(30, |m| m as u32))
            .collect();
        for (i, prompt) in prompts.iter().enumerate() {
            let ctx = PromptContext {
                cfg: cfgs[i % cfgs.len()],
                steps: steps[i % steps.len()],
                profile,
            };
            let mut all = advice(prompt, &ctx);
            for negative in [None, Some("blurry")] {
                all.extend(enhance(prompt, negative, &ctx, true).advice);
            }
            for cfg in &cfgs {
                all.extend(advice(prompt, &PromptContext { cfg: *cfg, ..ctx }));
            }
            for s in &steps {
                all.extend(advice(prompt, &PromptContext { steps: *s, ..ctx }));
            }
            for a in all {
                let zh = &a.i18n.zh_cn;
                assert!(
                    has_cjk(zh),
                    "{kind} {:?}: no Chinese text for {:?}",
                    a.kind,
                    a.message
                );
                assert_eq!(
                    number_set(&a.message),
                    number_set(zh),
                    "{kind} {}: {} / {zh}",
                    a.kind,
                    a.message
                );
                seen.insert(a.kind);
            }
        }
    }
    let all: std::collections::BTreeSet<String> =
        ADVICE_KINDS.iter().map(|k| k.to_string()).collect();
    assert_eq!(seen, all, "every advice kind reached");
}
