//! What is sent: the Slack message, the webhook body from its template, the HMAC signature,
//! and sexagesimal positions.

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::proto::Detection;

use super::rules::short_timescale;

/// RA (degrees) as `hh:mm:ss.ss`.
pub fn ra_hms(ra_deg: f64) -> String {
    if !ra_deg.is_finite() {
        return "nan".into();
    }
    // Whole hundredths of a second of time, so rounding carries into the minutes and hours.
    let day = 24 * 3600 * 100;
    let cs = ((ra_deg.rem_euclid(360.0) / 15.0 * 3600.0 * 100.0).round() as i64).rem_euclid(day);
    format!("{:02}:{:02}:{:02}.{:02}", cs / 360_000, cs / 6000 % 60, cs / 100 % 60, cs % 100)
}

/// Dec (degrees) as `±dd:mm:ss.s`.
pub fn dec_dms(dec_deg: f64) -> String {
    if !dec_deg.is_finite() {
        return "nan".into();
    }
    let sign = if dec_deg < 0.0 { '-' } else { '+' };
    let ds = (dec_deg.abs() * 3600.0 * 10.0).round() as i64;
    format!("{sign}{:02}:{:02}:{:02}.{}", ds / 36_000, ds / 600 % 60, ds / 10 % 60, ds % 10)
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Placeholders a Slack `link_template` may use.
pub const LINK_FIELDS: [&str; 3] = ["object_id", "alert_id", "survey"];

/// `template` with `{object_id}`, `{alert_id}`, `{survey}` replaced, percent-encoded.
pub fn link(template: &str, d: &Detection) -> String {
    template
        .replace("{object_id}", &percent_encode(&d.object_id))
        .replace("{alert_id}", &percent_encode(&d.alert_id))
        .replace("{survey}", &percent_encode(&d.survey))
}

/// Slack's mrkdwn needs `&`, `<` and `>` escaped.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The Slack message: `text` (the notification's fallback) and `blocks`.
pub fn slack_message(rule: &str, d: &Detection, link_template: Option<&str>) -> Value {
    let object = if d.object_id.is_empty() { "(no object id)".to_string() } else { d.object_id.clone() };
    let ts = short_timescale(&d.timescale);
    let text = format!(
        "blink {rule}: {} {} {} score {:.1} ({ts}) at RA {:.5} Dec {:+.5}",
        d.survey, object, d.band, d.score, d.ra, d.dec
    );
    let pos = format!("{:.5} {:+.5}\n{} {}", d.ra, d.dec, ra_hms(d.ra), dec_dms(d.dec));
    let field = |name: &str, v: String| json!({"type": "mrkdwn", "text": format!("*{name}*\n{}", slack_escape(&v))});
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": slack_escape(&text)}}),
        json!({"type": "section", "fields": [
            field("Object", object.clone()),
            field("Survey", d.survey.clone()),
            field("RA, Dec (deg)", pos),
            field("Band", d.band.clone()),
            field("Score", format!("{:.2} sigma", d.score)),
            field("Timescale", ts.to_string()),
            field("Alert", d.alert_id.clone()),
            field("MJD (TAI)", format!("{:.5}", d.mjd_tai)),
        ]}),
    ];
    if let Some(t) = link_template {
        let url = link(t, d);
        blocks.push(json!({"type": "context", "elements": [
            {"type": "mrkdwn", "text": format!("<{}|{}>", slack_escape(&url), slack_escape(&object))}
        ]}));
    }
    json!({"text": text, "blocks": blocks})
}

/// The values a webhook body template may use: the fields `blink subscribe` prints
/// (`cli::subscribe::detection_json`), and `rule`, `new_object`, `stack`, `timescale_short`,
/// `abs_score`, `ra_hms`, `dec_dms`.
pub fn template_values(rule: &str, d: &Detection) -> serde_json::Map<String, Value> {
    let mut m = match crate::cli::subscribe::detection_json(d) {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    m.insert("rule".into(), json!(rule));
    m.insert("new_object".into(), json!(d.new_object));
    m.insert("stack".into(), json!(d.timescale.starts_with("stack:")));
    m.insert("timescale_short".into(), json!(short_timescale(&d.timescale)));
    m.insert("abs_score".into(), json!(d.score.abs()));
    m.insert("ra_hms".into(), json!(ra_hms(d.ra)));
    m.insert("dec_dms".into(), json!(dec_dms(d.dec)));
    m
}

/// The default webhook body: [`crate::cli::subscribe::detection_json`] plus `rule` and `new_object`.
pub fn default_body(rule: &str, d: &Detection) -> Vec<u8> {
    let mut m = match crate::cli::subscribe::detection_json(d) {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    };
    m.insert("rule".into(), json!(rule));
    m.insert("new_object".into(), json!(d.new_object));
    Value::Object(m).to_string().into_bytes()
}

/// One piece of a parsed body template.
#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Field(String),
}

/// A webhook body template: text with `{field}` placeholders. Only braces around a bare name
/// (`[a-z_]+`) are placeholders, so the JSON's own braces stay as they are.
#[derive(Debug, Clone, PartialEq)]
pub struct BodyTemplate(Vec<Piece>);

impl BodyTemplate {
    /// Parses `text`; an unknown placeholder, or a result on the sample detections that is not
    /// JSON, is an error saying which.
    pub fn parse(text: &str) -> Result<BodyTemplate, String> {
        let known = template_values("rule", &super::rules::samples()[0]);
        let mut pieces = Vec::new();
        let mut rest = text;
        let mut literal = String::new();
        while let Some(open) = rest.find('{') {
            literal.push_str(&rest[..open]);
            let after = &rest[open + 1..];
            let name_len = after.bytes().take_while(|b| b.is_ascii_lowercase() || *b == b'_').count();
            if name_len > 0 && after.as_bytes().get(name_len) == Some(&b'}') {
                let name = &after[..name_len];
                if !known.contains_key(name) {
                    let mut names: Vec<&String> = known.keys().collect();
                    names.sort();
                    let names: Vec<&str> = names.into_iter().map(String::as_str).collect();
                    return Err(format!("unknown placeholder {{{name}}} (known: {})", names.join(", ")));
                }
                if !literal.is_empty() {
                    pieces.push(Piece::Text(std::mem::take(&mut literal)));
                }
                pieces.push(Piece::Field(name.to_owned()));
                rest = &after[name_len + 1..];
            } else {
                literal.push('{');
                rest = after;
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            pieces.push(Piece::Text(literal));
        }
        let t = BodyTemplate(pieces);
        for d in super::rules::samples() {
            let body = t.render("rule", &d);
            if let Err(e) = serde_json::from_slice::<Value>(&body) {
                return Err(format!(
                    "the body is not JSON on a sample detection ({e}): {}",
                    String::from_utf8_lossy(&body)
                ));
            }
        }
        Ok(t)
    }

    /// The body for `d`: a string value goes in JSON-escaped without its quotes (write
    /// `"{object_id}"`), a number or boolean as JSON (`{score}`), a missing value as `null`.
    pub fn render(&self, rule: &str, d: &Detection) -> Vec<u8> {
        let values = template_values(rule, d);
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Field(f) => match values.get(f) {
                    Some(Value::String(s)) => {
                        let quoted = Value::String(s.clone()).to_string();
                        out.push_str(&quoted[1..quoted.len() - 1]);
                    }
                    Some(v) => out.push_str(&v.to_string()),
                    None => out.push_str("null"),
                },
            }
        }
        out.into_bytes()
    }
}

/// `sha256=<hex>`: HMAC-SHA256 of `body` under `key`, the `X-Blink-Signature` header's value.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    // Never panics: HMAC takes keys of every length (`new_from_slice` only fails for MACs
    // with a fixed key size).
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of every length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231, test cases 1 and 2 (HMAC-SHA-256).
        assert_eq!(
            signature(&[0x0b; 20], b"Hi There"),
            "sha256=b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn sexagesimal_positions() {
        assert_eq!(ra_hms(0.0), "00:00:00.00");
        assert_eq!(ra_hms(15.0), "01:00:00.00");
        assert_eq!(ra_hms(359.99999999), "00:00:00.00");
        assert_eq!(ra_hms(123.456789), "08:13:49.63");
        assert_eq!(dec_dms(-12.345678), "-12:20:44.4");
        assert_eq!(dec_dms(89.99999999), "+90:00:00.0");
        assert_eq!(dec_dms(0.0), "+00:00:00.0");
        let mut rng = crate::testing::rng();
        for _ in 0..1000 {
            let ra: f64 = rng.gen_range(0.0..360.0);
            let s = ra_hms(ra);
            let p: Vec<f64> = s.split(':').map(|x| x.parse().unwrap()).collect();
            let back = (p[0] + p[1] / 60.0 + p[2] / 3600.0) * 15.0;
            let diff = (back - ra).abs();
            assert!(diff < 0.01 / 3600.0 * 15.0 || (360.0 - diff) < 0.01 / 3600.0 * 15.0, "{ra} {s}");
            assert!(p[1] < 60.0 && p[2] < 60.0);
            let dec: f64 = rng.gen_range(-90.0..90.0);
            let s = dec_dms(dec);
            let p: Vec<f64> = s[1..].split(':').map(|x| x.parse().unwrap()).collect();
            let back = (p[0] + p[1] / 60.0 + p[2] / 3600.0) * if s.starts_with('-') { -1.0 } else { 1.0 };
            assert!((back - dec).abs() <= 0.051 / 3600.0, "{dec} {s}");
            assert!(p[1] < 60.0 && p[2] < 60.0);
        }
    }

    #[test]
    fn slack_message_carries_the_fields_and_link() {
        let mut d = super::super::rules::samples()[1].clone();
        d.object_id = "ZTF21a<b>&c".into();
        d.ra = 123.456789;
        d.dec = -12.345678;
        let m = slack_message("bright", &d, Some("https://fink-portal.org/{object_id}?s={survey}&a={alert_id}"));
        let text = m["text"].as_str().unwrap();
        for want in ["bright", "ztf", "ZTF21a<b>&c", " r ", "-4.0", "(3n)", "123.45679", "-12.34568"] {
            assert!(text.contains(want), "{want} not in {text}");
        }
        let all = m["blocks"].to_string();
        for want in [
            "08:13:49.63",
            "-12:20:44.4",
            "ZTF21a&lt;b&gt;&amp;c",
            "3n",
            "-4.00 sigma",
            "Band",
            "https://fink-portal.org/ZTF21a%3Cb%3E%26c?s=ztf&amp;a=1",
        ] {
            assert!(all.contains(want), "{want} not in {all}");
        }
        assert!(!slack_message("bright", &d, None)["blocks"].to_string().contains("fink"));
    }

    #[test]
    fn webhook_template_escapes_values() {
        let t = BodyTemplate::parse(r#"{"text": "{rule}: {object_id} in {band}", "score": {score}, "new": {new_object}, "snr": {survey_snr}, "raw": {}}"#).unwrap();
        let mut rng = crate::testing::rng();
        for _ in 0..200 {
            let mut d = super::super::rules::samples()[0].clone();
            // Quotes, backslashes, control and non-ASCII characters.
            d.object_id = (0..rng.gen_range(0..20))
                .map(|_| ['"', '\\', '\n', '\u{1}', 'é', '{', '}', 'a', '/'][rng.gen_range(0..9)])
                .collect();
            d.score = rng.gen_range(-100.0..100.0);
            d.survey_snr = if rng.gen() { f64::NAN } else { 3.5 };
            let body = t.render("r1", &d);
            let v: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(v["text"], format!("r1: {} in r", d.object_id));
            // serde_json parses floats to within an ulp or so (no `float_roundtrip`).
            assert!((v["score"].as_f64().unwrap() - d.score).abs() <= 1e-12 * d.score.abs());
            assert_eq!(v["new"], true);
            assert_eq!(v["snr"], if d.survey_snr.is_nan() { Value::Null } else { json!(3.5) });
            assert_eq!(v["raw"], json!({}));
        }
        assert!(BodyTemplate::parse(r#"{"a": "{nope}"}"#).unwrap_err().contains("{nope}"));
        assert!(BodyTemplate::parse(r#"{"a": {object_id}}"#).unwrap_err().contains("not JSON"));
        // The default body has `blink subscribe`'s fields.
        let d = &super::super::rules::samples()[0];
        let v: Value = serde_json::from_slice(&default_body("r1", d)).unwrap();
        let sub = crate::cli::subscribe::detection_json(d);
        for (k, val) in sub.as_object().unwrap() {
            assert_eq!(&v[k], val, "{k}");
        }
        assert_eq!((v["rule"].as_str(), v["new_object"].as_bool()), (Some("r1"), Some(true)));
    }
}
