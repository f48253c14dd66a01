//! The rules of a request's output constraint (JSON, regex or grammar),
//! its tools and its logit bias: one constraint at most, tools well named,
//! a required call alone, biases in range.

use super::*;

/// The one constraint a request's output follows, and the tools it offers.
pub(super) fn constraint_and_tools(
    format: Option<ResponseFormat>,
    regex: Option<String>,
    grammar: Option<String>,
    tools: Option<Vec<Tool>>,
    choice: Option<Value>,
) -> Result<(Option<Constraint>, Vec<Tool>, ToolChoice), InvalidParam> {
    let mut given: Vec<(Field, Constraint)> = Vec::new();
    match format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => given.push((Field::ResponseFormat, Constraint::JsonObject)),
        Some(ResponseFormat::JsonSchema { schema, .. }) => {
            if !schema.is_object() && !schema.is_boolean() {
                return Err(InvalidParam::new(Field::ResponseFormat, format!("schema must be a JSON schema object, got {schema}")));
            }
            given.push((Field::ResponseFormat, Constraint::JsonSchema(schema)));
        }
    }
    given.extend(regex.map(|r| (Field::Regex, Constraint::Regex(r))));
    given.extend(grammar.map(|g| (Field::Grammar, Constraint::Lark(g))));
    if given.len() > 1 {
        return Err(InvalidParam::sentence(given[1].0, "give at most one of a JSON response format, a regex and a grammar"));
    }
    for (field, c) in &given {
        let size = match c {
            Constraint::JsonObject => 0,
            Constraint::JsonSchema(s) => s.to_string().len(),
            Constraint::Regex(t) | Constraint::Lark(t) => t.len(),
        };
        if size > MAX_CONSTRAINT_BYTES {
            return Err(InvalidParam::new(*field, format!("is {size} bytes, over the limit of {MAX_CONSTRAINT_BYTES}")));
        }
    }
    let tools = tools.unwrap_or_default();
    let choice = match choice {
        None => ToolChoice::Auto,
        Some(v) => ToolChoice::parse(&v).map_err(|e| InvalidParam::new(Field::ToolChoice, e))?,
    };
    tools::check_tools(&tools, &choice).map_err(|(on_tools, e)| {
        if on_tools {
            InvalidParam::sentence(Field::Tools, format!("{{name}}{e}"))
        } else {
            InvalidParam::new(Field::ToolChoice, e)
        }
    })?;
    let forced = matches!(choice, ToolChoice::Required | ToolChoice::Named(_));
    if forced && !given.is_empty() {
        return Err(InvalidParam::sentence(Field::ToolChoice, "a required tool call cannot be combined with a JSON response format, a regex or a grammar"));
    }
    Ok((given.pop().map(|g| g.1), tools, choice))
}

/// `logitBias` as (token, bias) pairs.
pub(super) fn logit_bias(map: std::collections::BTreeMap<String, f64>) -> Result<Vec<(u32, f32)>, InvalidParam> {
    if map.len() > MAX_LOGIT_BIAS {
        return Err(InvalidParam::new(Field::LogitBias, format!("has {} entries, over the limit of {MAX_LOGIT_BIAS}", map.len())));
    }
    map.into_iter()
        .map(|(k, v)| {
            let id = k.parse::<u32>().map_err(|_| InvalidParam::new(Field::LogitBias, format!("keys must be token ids, got '{k}'")))?;
            if !(-100.0..=100.0).contains(&v) {
                return Err(InvalidParam::new(Field::LogitBias, format!("values must be in [-100, 100], got {v} for token {id}")));
            }
            Ok((id, v as f32))
        })
        .collect()
}
