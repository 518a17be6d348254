//! Strings with `{name}` placeholders (`{{` and `}}` for literal braces).

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Lit(String),
    Var(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' => name.push(c),
                            Some(c) => return Err(format!("`{c}` is not allowed in a placeholder name in `{s}`")),
                            None => return Err(format!("unclosed `{{` in `{s}` (write `{{{{` for a literal brace)")),
                        }
                    }
                    if name.is_empty() {
                        return Err(format!("empty placeholder `{{}}` in `{s}`"));
                    }
                    if !lit.is_empty() {
                        parts.push(Part::Lit(std::mem::take(&mut lit)));
                    }
                    parts.push(Part::Var(name));
                }
                '}' => return Err(format!("unmatched `}}` in `{s}` (write `}}}}` for a literal brace)")),
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            parts.push(Part::Lit(lit));
        }
        Ok(Template { parts })
    }

    pub fn placeholders(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(v.as_str()),
            Part::Lit(_) => None,
        })
    }

    /// Renders into one or more argv words. A placeholder that stands alone and has several values (the input
    /// directories of a fan-in) becomes several words; inside a longer word the values are joined by spaces.
    pub fn render(&self, lookup: &dyn Fn(&str) -> Option<Vec<String>>) -> Result<Vec<String>, String> {
        if let [Part::Var(name)] = self.parts.as_slice() {
            return lookup(name).ok_or_else(|| format!("unknown placeholder `{{{name}}}`"));
        }
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(l) => out.push_str(l),
                Part::Var(name) => {
                    let vals = lookup(name).ok_or_else(|| format!("unknown placeholder `{{{name}}}`"))?;
                    out.push_str(&vals.join(" "));
                }
            }
        }
        Ok(vec![out])
    }

    /// Renders into one string (multi-valued placeholders joined by spaces).
    pub fn render_string(&self, lookup: &dyn Fn(&str) -> Option<Vec<String>>) -> Result<String, String> {
        Ok(self.render(lookup)?.join(" "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<Vec<String>> {
        match name {
            "fold" => Some(vec!["3".into()]),
            "in" => Some(vec!["/a".into(), "/b".into()]),
            _ => None,
        }
    }

    #[test]
    fn renders_placeholders_and_escapes() {
        let t = Template::parse("f{fold}.txt {{x}}").unwrap();
        assert_eq!(t.render(&lookup).unwrap(), vec!["f3.txt {x}"]);
        assert_eq!(t.placeholders().collect::<Vec<_>>(), vec!["fold"]);
    }

    #[test]
    fn lone_multi_valued_placeholder_becomes_several_words() {
        assert_eq!(Template::parse("{in}").unwrap().render(&lookup).unwrap(), vec!["/a", "/b"]);
        assert_eq!(Template::parse("x={in}").unwrap().render(&lookup).unwrap(), vec!["x=/a /b"]);
    }

    #[test]
    fn rejects_malformed() {
        assert!(Template::parse("{fold").is_err());
        assert!(Template::parse("a}b").is_err());
        assert!(Template::parse("{}").is_err());
        assert!(Template::parse("{a b}").is_err());
        assert!(Template::parse("{nope}").unwrap().render(&lookup).is_err());
    }
}
