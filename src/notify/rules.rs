//! Rule conditions: `evalexpr` expressions over a detection's fields, compiled and checked once
//! at start-up.

use evalexpr::{build_operator_tree, Context, DefaultNumericTypes, EvalexprError, EvalexprResult, Node, Value};

use crate::proto::Detection;

/// What `survey_snr` is when the detection has none (NaN in the detection): every comparison
/// such as `survey_snr > 5` is then false; `has_survey_snr` tells the two apart.
pub const NO_SURVEY_SNR: f64 = -1.0e300;

/// The variables a condition may use, in the order of [`Vars`].
pub const VARIABLES: [&str; 17] = [
    "score",
    "abs_score",
    "flux",
    "flux_err",
    "survey",
    "band",
    "object_id",
    "alert_id",
    "ra",
    "dec",
    "mjd_tai",
    "timescale",
    "stack",
    "detected",
    "new_object",
    "survey_snr",
    "has_survey_snr",
];

/// `"epoch"` stays `"epoch"`, `"stack:3n"` becomes `"3n"`: the form rules compare with.
pub fn short_timescale(timescale: &str) -> &str {
    timescale.strip_prefix("stack:").unwrap_or(timescale)
}

/// A detection's values, one per [`VARIABLES`] entry.
pub struct Vars([Value; VARIABLES.len()]);

impl Vars {
    pub fn of(d: &Detection) -> Vars {
        let snr = if d.survey_snr.is_finite() { d.survey_snr } else { NO_SURVEY_SNR };
        Vars([
            Value::Float(d.score),
            Value::Float(d.score.abs()),
            Value::Float(d.flux),
            Value::Float(d.flux_err),
            Value::String(d.survey.clone()),
            Value::String(d.band.clone()),
            Value::String(d.object_id.clone()),
            Value::String(d.alert_id.clone()),
            Value::Float(d.ra),
            Value::Float(d.dec),
            Value::Float(d.mjd_tai),
            Value::String(short_timescale(&d.timescale).to_owned()),
            Value::Boolean(d.timescale.starts_with("stack:")),
            Value::Boolean(d.detected),
            Value::Boolean(d.new_object),
            Value::Float(snr),
            Value::Boolean(d.survey_snr.is_finite()),
        ])
    }
}

impl Context for Vars {
    type NumericTypes = DefaultNumericTypes;

    fn get_value(&self, identifier: &str) -> Option<&Value> {
        VARIABLES.iter().position(|v| *v == identifier).and_then(|i| self.0.get(i))
    }

    fn call_function(&self, identifier: &str, _argument: &Value) -> EvalexprResult<Value> {
        Err(EvalexprError::FunctionIdentifierNotFound(identifier.to_owned()))
    }

    fn are_builtin_functions_disabled(&self) -> bool {
        false
    }

    fn set_builtin_functions_disabled(&mut self, _disabled: bool) -> EvalexprResult<()> {
        Err(EvalexprError::ContextNotMutable)
    }
}

/// A compiled condition.
#[derive(Debug)]
pub struct Condition {
    tree: Node,
}

impl Condition {
    /// Parses `text` and checks it: only known variables, no assignments, and a boolean on
    /// sample detections (an epoch and a stack detection). The error is the parser's or
    /// evaluator's message.
    pub fn compile(text: &str) -> Result<Condition, String> {
        let tree: Node = build_operator_tree(text).map_err(|e| e.to_string())?;
        for id in tree.iter_variable_identifiers() {
            if !VARIABLES.contains(&id) {
                return Err(format!("unknown variable `{id}` (known: {})", VARIABLES.join(", ")));
            }
        }
        let c = Condition { tree };
        for d in samples() {
            c.eval(&d).map_err(|e| format!("{e} (on a sample {} detection)", d.timescale))?;
        }
        Ok(c)
    }

    /// Whether `d` matches. An evaluation error (say, an integer division by zero) is returned
    /// for the caller to log; it does not match.
    pub fn eval(&self, d: &Detection) -> Result<bool, String> {
        self.tree.eval_boolean_with_context(&Vars::of(d)).map_err(|e| e.to_string())
    }
}

/// Detections to try a condition on at start-up: every type and both timescale forms.
pub fn samples() -> [Detection; 2] {
    let epoch = Detection {
        id: "ztf:1".into(),
        survey: "ztf".into(),
        alert_id: "1".into(),
        object_id: "ZTF21aaaaaaa".into(),
        ra: 150.0,
        dec: 2.0,
        mjd_tai: 60000.5,
        band: "r".into(),
        score: 9.0,
        flux: 100.0,
        flux_err: 10.0,
        survey_snr: 8.0,
        flux_scale: 1.0,
        background: 0.0,
        detected: true,
        timescale: "epoch".into(),
        sequence: 1,
        new_object: true,
        ..Default::default()
    };
    let stack = Detection {
        id: "ztf:1:stack:3n".into(),
        score: -4.0,
        survey_snr: f64::NAN,
        detected: false,
        timescale: "stack:3n".into(),
        new_object: false,
        ..epoch.clone()
    };
    [epoch, stack]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn random_detection(rng: &mut impl Rng) -> Detection {
        Detection {
            survey: ["ztf", "rubin"][rng.gen_range(0..2)].into(),
            alert_id: rng.gen::<u64>().to_string(),
            object_id: format!("ZTF{}", rng.gen::<u32>()),
            ra: rng.gen_range(0.0..360.0),
            dec: rng.gen_range(-90.0..90.0),
            mjd_tai: rng.gen_range(58000.0..62000.0),
            band: ["g", "r", "i"][rng.gen_range(0..3)].into(),
            score: rng.gen_range(-30.0..30.0),
            flux: rng.gen_range(-1e4..1e4),
            flux_err: rng.gen_range(0.0..1e3),
            survey_snr: if rng.gen() { rng.gen_range(-10.0..50.0) } else { f64::NAN },
            detected: rng.gen(),
            new_object: rng.gen(),
            timescale: ["epoch", "stack:1n", "stack:3n", "stack:10n", "stack:30n"][rng.gen_range(0..5)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn timescale_short_form() {
        assert_eq!(short_timescale("epoch"), "epoch");
        assert_eq!(short_timescale("stack:3n"), "3n");
        assert_eq!(short_timescale("stack:30n"), "30n");
    }

    #[test]
    fn conditions_agree_with_the_fields_on_random_detections() {
        let mut rng = crate::testing::rng();
        let bright = Condition::compile(r#"score >= 8 && timescale == "1n" && new_object"#).unwrap();
        let abs = Condition::compile("abs_score > 5.5 && !stack").unwrap();
        let snr = Condition::compile("survey_snr > 5").unwrap();
        let has = Condition::compile(r#"has_survey_snr && band != "g" && survey == "ztf""#).unwrap();
        let pos = Condition::compile("ra > 100 && dec < 0 && mjd_tai >= 60000 && flux / flux_err > 3").unwrap();
        let ids =
            Condition::compile(r#"str::substring(object_id, 0, 3) == "ZTF" && alert_id != "" && detected"#).unwrap();
        for _ in 0..500 {
            let d = random_detection(&mut rng);
            let ts = d.timescale.strip_prefix("stack:").unwrap_or(&d.timescale).to_string();
            assert_eq!(bright.eval(&d), Ok(d.score >= 8.0 && ts == "1n" && d.new_object));
            assert_eq!(abs.eval(&d), Ok(d.score.abs() > 5.5 && d.timescale == "epoch"));
            assert_eq!(snr.eval(&d), Ok(d.survey_snr > 5.0));
            assert_eq!(has.eval(&d), Ok(d.survey_snr.is_finite() && d.band != "g" && d.survey == "ztf"));
            assert_eq!(
                pos.eval(&d),
                Ok(d.ra > 100.0 && d.dec < 0.0 && d.mjd_tai >= 60000.0 && d.flux / d.flux_err > 3.0)
            );
            assert_eq!(ids.eval(&d), Ok(d.detected));
        }
    }

    #[test]
    fn bad_conditions_are_refused_with_the_reason() {
        for (text, want) in [
            ("score >= ", ""),
            ("scor > 3", "unknown variable `scor`"),
            ("score > 3 && nope", "unknown variable `nope`"),
            ("score + 1", "Boolean"),
            ("band", "Boolean"),
            ("score = 3", ""),
            ("band > 3", ""),
            ("(score > 1", ""),
        ] {
            let e = Condition::compile(text).map(|_| ()).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
